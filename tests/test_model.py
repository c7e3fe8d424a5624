"""The tiny Qwen2.5-VL: built offline, saved, reloaded by the loader every stage uses, and generating."""
import torch

import data
import model
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES


def test_tiny_model_round_trips_and_generates(tiny_model_dir, synth_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    m = model.load_model(tiny_model_dir)
    assert isinstance(m, Qwen2_5_VLForConditionalGeneration)
    # save again and reload: identical weights, i.e. the checkpoint format is the real one
    m.save_pretrained(tmp_path / "again")
    m2 = model.load_model(str(tmp_path / "again"))
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)

    processor = model.load_processor(tiny_model_dir)
    tok = processor.tokenizer
    # the special tokens the processor and the config agree on
    assert m.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>") == processor.video_token_id
    assert tok.decode(tok("<think>a</think> <time>[1.50, 2.00]</time>")["input_ids"]) == \
        "<think>a</think> <time>[1.50, 2.00]</time>"

    s = data.read_jsonl(synth_dir / "test.jsonl")[0]
    inp = data.build_inputs(processor, [s], nframes=NFRAMES, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    n_video = (inp["input_ids"] == processor.video_token_id).sum().item()
    assert n_video == NFRAMES // 2 * (56 // 28) ** 2  # temporal patches x merged spatial tokens
    torch.manual_seed(0)
    out = m.generate(**inp, max_new_tokens=12, do_sample=True, suppress_tokens=model.suppress_ids(tok))
    new = out[0, inp["input_ids"].shape[1]:]
    assert 0 < len(new) <= 12
    assert not set(new.tolist()) & set(model.suppress_ids(tok))  # vision tokens are never sampled


def test_meta_info_counts_the_real_7b(capsys):
    import sys
    from conftest import ASSETS
    sys.argv = ["model.py", "info", "--meta", "--model", str(ASSETS / "qwen2_5_vl_7b_config.json")]
    model.main()
    assert "8,292,166,656 parameters" in capsys.readouterr().out
