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

SHARED = ROOT.parent / "shared" / "data"
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
