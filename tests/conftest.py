"""Shared fixtures: one tiny Qwen2.5-VL and one small synthetic dataset per test session, built by the
same commands a user runs (`model.py tiny`, `data.py synth`), in a temp dir."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))

ASSETS = ROOT / "assets"  # the real annotation files the repo ships (assets/SOURCES.md)
# The tiny preset's video setting: 16 frames at 56x56 -> 8 temporal patches x 4 tokens = 32 video tokens.
NFRAMES, MAX_PIXELS, MIN_PIXELS = 16, 56 * 56, 56 * 56


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import model
    return model.build_tiny(str(tmp_path_factory.mktemp("tiny_model")), hidden=64, layers=2, heads=2,
                            vision_hidden=32, vision_depth=1)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    import data
    out = tmp_path_factory.mktemp("synth")
    data.synth(str(out), n_train=4, n_test=2, seed=0)
    return out


@pytest.fixture(scope="session")
def answering_model_dir(tiny_model_dir, synth_dir, tmp_path_factory):
    """The tiny model overfitted (250 steps of sft.py's loss, ~6 s) to answer the three queries of the
    first synthetic test video in the paper's format, each with its own true span: a model whose
    answers parse, for the tests of what users do with a trained model (predict.py, demo.py)."""
    import torch
    import data
    import model
    import sft
    samples = data.read_jsonl(synth_dir / "test.jsonl")[:3]  # one video, three queries
    assert len({s.video for s in samples}) == 1
    processor, m = model.load_processor(tiny_model_dir), model.load_model(tiny_model_dir)
    video = data.load_video(samples[0], NFRAMES, MAX_PIXELS, MIN_PIXELS)
    answers = [data.format_answer(f"I look for: {s.query}", s.spans[0]) for s in samples]
    batch = data.build_inputs(processor, samples, [video] * 3, answers=answers, nframes=NFRAMES,
                              max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, padding_side="right")
    labels = sft.make_labels(batch["input_ids"], processor.tokenizer)
    torch.manual_seed(0)
    model.freeze_vision(m)  # as the tiny preset trains
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(250):  # 120 steps left two of the three queries with one answer
        loss = sft.sft_loss(m, dict(batch), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = str(tmp_path_factory.mktemp("answering_model"))
    m.save_pretrained(out)
    processor.save_pretrained(out)
    return out
