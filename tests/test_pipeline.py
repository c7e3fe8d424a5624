"""A reduced smoke of the tiny preset: `bash run.sh tiny` end to end with a few steps of each stage, as a
user runs it, then again to check that every finished stage is skipped."""
import json
import os
import re
import subprocess
import sys
from conftest import ROOT

SMALL = dict(TRAIN_VIDEOS="4", TEST_VIDEOS="2", HIDDEN="32", LAYERS="1", VISION_HIDDEN="32", VISION_DEPTH="1",
             SFT_STEPS="2", SFT_BATCH="4", GRPO_STEPS="1", GRPO_PROMPTS="2", MAX_NEW_TOKENS="8",
             NOISE="0.5", ANNOTATE_ARGS="--rl-include-coldstart")


def run_tiny(run_dir, *extra, cmd="tiny", **settings):
    env = dict(os.environ, RUN=str(run_dir), **SMALL, **settings)
    return subprocess.run(["bash", str(ROOT / "run.sh"), cmd, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_tiny_preset_smoke(tmp_path):
    run_dir = tmp_path / "tiny"
    p = run_tiny(run_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # every stage printed its plain command
    for cmd in ("data.py synth", "model.py tiny", "annotate.py", "sft.py", "grpo.py", "eval.py --model",
                "eval.py baseline"):
        assert f"+ python {cmd}" in p.stdout, cmd
    res = json.loads((run_dir / "results.json").read_text())
    for row in ("base", "sft", "grpo", "constant_baseline"):
        assert set(res[row]) >= {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU"}
        assert all(0 <= res[row][k] <= 100 for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU"))
        assert res[row]["n"] == 6  # 2 test videos x 3 queries, every sample in the denominator
    assert res["wall_seconds"] > 0
    assert "best constant span" in p.stdout and "SFT + GRPO" in p.stdout
    assert (run_dir / "grpo" / "curves.png").stat().st_size > 0

    # a second run finds every stage done: no training, no generation, the same table
    again = run_tiny(run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    for cmd in ("data.py synth", "model.py tiny", "eval.py --model", "eval.py baseline"):
        assert f"+ python {cmd}" not in again.stdout, cmd
    assert "Nothing to do" in again.stdout  # sft.py --resume on a finished run
    assert json.loads((run_dir / "results.json").read_text())["sft"] == res["sft"]

    # bash run.sh taro on the same run: only TaRO's GRPO and its eval run; the table gains its row
    taro = run_tiny(run_dir, cmd="taro")
    assert taro.returncode == 0, taro.stdout[-3000:] + taro.stderr[-3000:]
    assert "+ python grpo.py" in taro.stdout and "--taro" in taro.stdout and "SFT + TaRO" in taro.stdout
    with_taro = json.loads((run_dir / "results.json").read_text())
    assert with_taro["taro"]["n"] == 6 and with_taro["grpo"] == res["grpo"]  # plain GRPO is not re-run
    assert "guided" in (run_dir / "taro" / "metrics.jsonl").read_text().splitlines()[0]

    # bash run.sh ablations on the same run: seed 0's SFT and GRPO are reused, seed 1 is trained, and
    # each switch of the paper's Tables 3 and 4 gets its row (mean ± std over the 2 seeds) and the figure
    ab = run_tiny(run_dir, cmd="ablations", ZERO_STEPS="1")
    assert ab.returncode == 0, ab.stdout[-3000:] + ab.stderr[-3000:]
    # the two seeds side by side (JOBS=2 on a CPU): seed 1 on worker 1, whose output is its log
    assert re.search(rf"seeds 1 run alongside \(JOBS=2, \d+ thread\(s\) each\): log in {run_dir}/worker1.log",
                     ab.stdout), ab.stdout[-3000:]
    worker1 = (run_dir / "worker1.log").read_text()
    assert f"final model in {run_dir}/seed1/sft/model" in worker1  # seed 1 trained
    assert f"final model in {run_dir}/sft/model" not in ab.stdout + worker1  # seed 0 found done
    for flag in ("coldstart_unfiltered.jsonl", "rl_unfiltered.jsonl", f"--model {run_dir}/base_model"):
        assert flag in ab.stdout, flag
    res = json.loads((run_dir / "results.json").read_text())
    assert [r["seed"] for r in res["seeds"]] == [0, 1] and set(res["seeds"][1]) >= {"sft", "grpo"}
    rows = res["ablations"]
    assert set(rows) == {"sft", "grpo", "grpo_r1u", "grpo_rl_unfiltered", "zero", "zero_unfiltered"}
    assert all(r["seeds"] == 2 and r["n"] == 6 and "mIoU_std" in r for r in rows.values())
    assert rows["grpo"]["mIoU"] == res["mean_over_seeds"]["grpo"]["mIoU"]
    assert "R1-Zero (RL data filtered)" in ab.stdout and "GRPO's lift over SFT" in ab.stdout
    assert (run_dir / "ablations.png").stat().st_size > 0


def test_paper_dry_run_checks_the_16_gpu_plan():
    p = subprocess.run(["bash", str(ROOT / "run.sh"), "paper", "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # SFT: global batch 8 on one node of 8; GRPO: 128 prompts x 8 over 16 ranks
    assert "global batch 8 = micro-batch 1 x grad accumulation 1 x 8 ranks" in p.stdout
    assert "128 prompts x G=8 = 1024 answers per step over 16 ranks (8 prompts, 64 answers per rank)" in p.stdout
    assert '"train_batch_size": 128' in p.stdout and '"stage": 3' in p.stdout
    assert "parameters 8,292,166,656" in p.stdout  # the real 7B config, built on the meta device
    assert "GiB" in p.stdout and "s/step" in p.stdout


def test_paper_ablation_rows_are_checked_before_anything_runs():
    """ABLATION_ROWS picks rows (tests/test_rehearsal.py runs two); one this run cannot make (R1-U needs
    our own annotation: without GEMINI_API_KEY only R1-Zero on the released RL set exists) stops the run
    naming the rows it can."""
    env = {k: v for k, v in os.environ.items() if k != "GEMINI_API_KEY"}
    p = subprocess.run(["bash", str(ROOT / "run.sh"), "paper", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(env, ABLATIONS="1", ABLATION_ROWS="zero grpo_r1u"))
    assert p.returncode == 2 and "ABLATION_ROWS: 'grpo_r1u' is not one of the rows this run can make: zero" in p.stderr
    assert "+ python" not in p.stdout  # refused before any stage (the rehearsal runs a subset that exists)
