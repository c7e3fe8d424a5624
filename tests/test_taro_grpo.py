"""TaRO in the GRPO loop (grpo.py --taro): guided rollouts generated exactly from their own prefixes, the
bonus given per rollout against its own group's drops, the curriculum in the logs, and the loop on one
process and as 2-process ZeRO-3 (ranks with different numbers of guided rollouts must not deadlock)."""
import json
import statistics
from collections import defaultdict

import pytest
import torch

import data
import grpo
import model as M
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES
from test_grpo import run_grpo
from test_gpu_paths import torchrun

VIDEO = ["--nframes", str(NFRAMES), "--max-pixels", str(MAX_PIXELS), "--min-pixels", str(MIN_PIXELS)]
PREFIX = "<think>\nI need to find the specific moment "


@pytest.mark.parametrize("shared_decode", [True, False])
def test_rows_continue_their_own_prefix_exactly(tiny_model_dir, synth_dir, shared_decode):
    """Guided and free rows of two prompts of different lengths in one generate call, the prompts
    prefilled once (left-padded batch, each row [prompt; pad; prefix]) give (greedy) the same
    continuation as plain `generate` on that row alone, unpadded: the padding moves no position. Each
    row starts with its prefix and is cut at max_len tokens in all. With the prompt's cache held once
    (grpo.py's attention) and repeated per row."""
    plain, proc = M.load_model(tiny_model_dir), M.load_processor(tiny_model_dir)
    m = M.load_model(tiny_model_dir)
    if shared_decode:
        M.use_prefix_attention(m)
    all_samples = data.read_jsonl(synth_dir / "train.jsonl")
    ss = [all_samples[0], next(x for x in all_samples if len(x.query) != len(all_samples[0].query))]
    vkw = dict(nframes=NFRAMES, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    videos = [data.load_video(s, **vkw) for s in ss]
    batch = data.build_inputs(proc, ss, videos, **vkw)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 2  # one prompt is left-padded
    tok = proc.tokenizer
    n = 12
    gen = dict(grpo.sampling_kwargs(m, tok, 1.0, n), do_sample=False, temperature=None, top_k=None, top_p=None,
               min_new_tokens=n)
    guided = [tok.encode(data.guided_prefix(s.query, s.captions, torch.Generator().manual_seed(i)),
                         add_special_tokens=False) for i, s in enumerate(ss)]
    short = tok.encode("<think>\nI", add_special_tokens=False)
    prefixes = [[], short, guided[0], guided[1], [], short]  # G = 3 rows per prompt
    together = M.generate_from_prefixes(m, batch, 3, prefixes, gen, tok.pad_token_id, max_len=400,
                                        shared_decode=shared_decode)
    for r, p in enumerate(prefixes):
        one = data.build_inputs(proc, [ss[r // 3]], [videos[r // 3]], **vkw)
        pre = torch.tensor([p], dtype=torch.long)
        seqs = plain.generate(input_ids=torch.cat([one["input_ids"], pre], 1),
                              attention_mask=torch.ones(1, one["input_ids"].shape[1] + len(p), dtype=torch.long),
                              mm_token_type_ids=torch.cat([one["mm_token_type_ids"], torch.zeros_like(pre)], 1),
                              pixel_values_videos=one["pixel_values_videos"], video_grid_thw=one["video_grid_thw"],
                              second_per_grid_ts=one["second_per_grid_ts"], **gen)
        assert together[r, :len(p)].tolist() == p
        assert together[r, len(p):len(p) + n].tolist() == seqs[0, -n:].tolist(), r
    cut = M.generate_from_prefixes(m, batch, 3, prefixes, gen, tok.pad_token_id, max_len=len(guided[0]) + 3,
                                   shared_decode=shared_decode)
    assert cut.shape[1] == len(guided[0]) + 3 and torch.equal(cut[2], together[2, :cut.shape[1]])


def _groups(path):
    by = defaultdict(list)
    for r in map(json.loads, path.read_text().splitlines()):
        by[(r["step"], r["id"])].append(r)
    return by


def test_taro_step_per_rollout_bonus_and_curriculum(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "taro"
    run_grpo("--model", tiny_model_dir, "--data", str(synth_dir / "train.jsonl"), "--out", str(out), *VIDEO,
             "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "48", "--steps", "3", "--taro",
             "--guided-steps", "3", "--tsr-iou-min", "0", "--log-rollouts", "100")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # p = 1, 0.5, 0 over 3 steps; every sample has captions
    assert recs[0]["guided"] == 1.0 and recs[-1]["guided"] == 0.0
    assert all("bonus_rate" in r and "tsr_drop" in r for r in recs)
    groups = _groups(out / "rollouts.jsonl")
    assert len(groups) == 6 and all(len(g) == 4 for g in groups.values())
    for (step, _), g in groups.items():
        mean = statistics.mean(r["drop"] for r in g)  # exact, as reward.temporal_sensitivity_bonus takes it
        for r in g:  # each rollout judged by its own drop against its own group's mean (IoU gate off)
            assert r["bonus"] == (0.3 if r["drop"] > mean else 0.0), g
            assert r["response"].startswith(PREFIX) == r["guided"]
            assert r["reward"] >= r["bonus"]
    assert any(r["bonus"] > 0 for g in groups.values() for r in g)
    assert (out / "curves.png").stat().st_size > 0


def test_taro_two_process_zero3_mixed_guidance(tiny_model_dir, synth_dir, tmp_path):
    # p = 0.5 at step 1: the ranks draw different numbers of guided rollouts; ZeRO-3 without gathering
    # for the rollout, so every forward is collective: the loop must still make the same calls on both.
    out = tmp_path / "z3"
    p = torchrun("grpo.py", "--model", tiny_model_dir, "--data", synth_dir / "train.jsonl", "--out", out, *VIDEO,
                 "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "24", "--steps", "2",
                 "--zero-stage", "3", "--taro", "--guided-steps", "2", "--guided-p0", "0.5", "--log-rollouts", "100")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and 0 < recs[0]["guided"] < 1 and recs[1]["guided"] == 0.0
    assert (out / "model" / "config.json").is_file()
