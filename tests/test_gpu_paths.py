"""The GPU paths a CPU can still check: ZeRO-3 weights gathered once per rollout (bytes all-gathered do
not grow with the answer length), a bad video that stops no rank and hangs none, a --out that every
rank must see, and gpu_check.py's CPU-checkable parts (arguments, the cut-down 7B config, the
extrapolation arithmetic, and its refusal to run without a GPU)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import data
import forked
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES, ROOT

PY = sys.executable
VIDEO = ["--nframes", str(NFRAMES), "--max-pixels", str(MAX_PIXELS), "--min-pixels", str(MIN_PIXELS)]


def torchrun(script, *args, timeout=300):
    """`torchrun --nproc_per_node 2 SCRIPT ARGS`, its two ranks started by tests/forked.py."""
    return forked.run(str(script), args, nproc=2, timeout=timeout)


def grpo_args(model_dir, data_path, out, *extra):
    return ["--model", model_dir, "--data", data_path, "--out", out, "--group-size", "2", "--prompts-per-step", "2",
            "--steps", "1", "--zero-stage", "3", *VIDEO, *extra]


def test_gather_for_rollout_gathers_once_whatever_the_answer_length(tiny_model_dir, synth_dir, tmp_path):
    """2 ranks, ZeRO-3, one step: the bytes all-gathered (counted in DeepSpeed's torch backend) with
    --gather-for-rollout are about the same for 8- and 40-token answers. Without it they grow by about
    one copy of the language model per generated token (measured: 34.2 MB at 40 tokens against 6.9 MB
    with the flag, for the 0.24M-parameter model)."""
    counts = {}
    for n in (8, 40):
        out = tmp_path / f"out{n}"
        p = torchrun("tests/probe_allgather.py", tmp_path / f"count{n}",
                     *grpo_args(tiny_model_dir, synth_dir / "train.jsonl", out, "--max-new-tokens", n,
                                "--gather-for-rollout"))
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert rec["length"] > n / 2  # the random model mostly runs to the limit: the length really differs
        counts[n] = int((tmp_path / f"count{n}.rank0").read_text())
    import model
    m = model.load_model(tiny_model_dir)
    full = sum(p.numel() * p.element_size() for p in m.parameters())
    # Counting works (a rollout and an update forward each gather the model at least once) ...
    assert counts[8] > 1.5 * full, (counts, full)
    # ... and five times the tokens cost at most a few percent more: no gather per token.
    assert counts[40] < 1.15 * counts[8], counts


def _rl_set_with_a_bad_video(synth_dir, tmp_path):
    good = data.read_jsonl(synth_dir / "train.jsonl")[0]
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 1000)  # not a video
    bad = data.Sample(id="bad_one", video=str(tmp_path / "bad.mp4"), duration=good.duration, query=good.query,
                      spans=good.spans)
    data.write_jsonl(tmp_path / "rl.jsonl", [good, bad])  # 2 prompts per step over 2 ranks: one rank gets it
    return tmp_path / "rl.jsonl"


def test_a_bad_video_stops_no_rank_with_skip_bad_and_all_ranks_without(tiny_model_dir, synth_dir, tmp_path):
    rl = _rl_set_with_a_bad_video(synth_dir, tmp_path)
    p = torchrun("grpo.py", *grpo_args(tiny_model_dir, rl, tmp_path / "skip", "--max-new-tokens", 8, "--steps", 2,
                                       "--skip-bad"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    log = p.stdout + p.stderr
    # counted: each step one rank's prompt was the bad one and was replaced
    assert [r["skipped_videos"] for r in recs] == [1, 1], log[-3000:]
    assert "sample bad_one: " in log and "skipped videos 1" in log, log[-3000:]
    assert (tmp_path / "skip" / "model" / "config.json").is_file()

    # Without --skip-bad: every rank stops at once with the sample named; none waits in a collective.
    p = torchrun("grpo.py", *grpo_args(tiny_model_dir, rl, tmp_path / "stop", "--max-new-tokens", 8), timeout=240)
    log = p.stdout + p.stderr
    assert p.returncode != 0, log[-3000:]
    assert "sample bad_one: " in log and "does not decode" in log and "--skip-bad" in log, log[-3000:]


SHARED_DIR = textwrap.dedent("""
    import os, sys
    import model
    device = model.init_distributed()
    rank = model.dist_env()[0]
    model.check_shared_dir(sys.argv[1] if rank == 0 else sys.argv[2], device, wait=1.0)
    print(f"rank {rank} ok", flush=True)
""")


def test_every_rank_must_see_the_same_out(tmp_path):
    script = tmp_path / "shared.py"
    script.write_text(SHARED_DIR)
    p = torchrun(script, tmp_path / "out", tmp_path / "out", timeout=120)
    assert p.returncode == 0 and "rank 0 ok" in p.stdout and "rank 1 ok" in p.stdout, p.stdout + p.stderr
    # rank 1 looks at another directory, as a node with a local --out would: both stop, rank 1 says why
    p = torchrun(script, tmp_path / "a", tmp_path / "b", timeout=120)
    assert p.returncode != 0 and "ok" not in p.stdout
    assert "rank 1 on " in p.stderr and "does not see rank 0's" in p.stderr and "every node shares" in p.stderr


# -----------------------------------------------------------------------------
# gpu_check.py: what runs without a GPU


def test_gpu_check_needs_a_gpu():
    p = subprocess.run(["bash", "run.sh", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 2 and "needs an NVIDIA GPU" in p.stderr, p.stdout + p.stderr


def test_gpu_check_cut_config_and_extrapolation():
    import gpu_check
    cfg = gpu_check.cut_config(2)
    assert cfg.text_config.num_hidden_layers == 2 and cfg.vision_config.depth == 32  # the decoder only is cut
    assert cfg.text_config.hidden_size == 3584 and cfg.text_config.vocab_size == 152064
    # peaks 10 and 13 GiB at 1 and 2 layers: 3 GiB per layer, 10 - 3 = 7 without any layer, 7 + 28 * 3 = 91
    assert gpu_check.extrapolate({1: 10.0, 2: 13.0}, 28) == pytest.approx((3.0, 91.0))
    assert gpu_check.extrapolate({2: 12.0, 4: 16.0}, 28) == pytest.approx((2.0, 64.0))
    a = gpu_check.parse_args(["--only", "memory", "--layers", "1", "3"])
    assert a.only == ["memory"] and a.layers == [1, 3]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "nothing"])
