"""`bash run.sh paper --rehearsal`: the paper preset's own stage commands on a CPU, against a miniature of the
released world served by a local stand-in for the hub (and, for ABLATIONS=1, for Gemini). The suite's two slow tests."""
import json
import os
import re
import subprocess

from conftest import ROOT


def assert_in_order(out: str, patterns: list[str]) -> None:
    """Each regex matches `out` after the previous one's match."""
    pos = 0
    for pattern in patterns:
        m = re.compile(pattern).search(out, pos)
        assert m, f"stage missing or out of order: {pattern}"
        pos = m.end()


def test_paper_rehearsal_runs_every_stage(tmp_path):
    # The base model and the final one on every benchmark (EVAL_MODELS: the SFT model is saved by the
    # same function as the GRPO one, and an eval start costs ~12 s of the suite's time)
    env = dict(os.environ, REHEARSAL_DIR=str(tmp_path), EVAL_MODELS="base grpo")
    p = subprocess.run(["bash", str(ROOT / "run.sh"), "paper", "--rehearsal"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
    out = p.stdout
    assert p.returncode == 0, out[-4000:] + p.stderr[-4000:]

    # The paper preset's stage commands, in order, with only sizes and locations changed
    stages = [r"\+ python prepare.py get --repo Qwen/Qwen2.5-VL-7B-Instruct",
              r"\+ python prepare.py videos --root",
              r"\+ python prepare.py get --repo RuizheChen/TVG_processed_data",
              r"\+ python data.py convert --format tvg_r1 .*TVG_RL.json",
              r"\+ python data.py convert --format tvg_r1 .*TVG_ColdStart.json .*--require-cot",
              r"\+ python prepare.py check --data .*coldstart_all.jsonl",
              r"\+ deepspeed --num_nodes 1 --num_gpus 2 .*sft.py .*--zero-stage 3 --grad-ckpt",
              r"\+ deepspeed --num_nodes 1 --num_gpus 2 .*grpo.py .*--zero-stage 3 --grad-ckpt --gather-for-rollout",
              r"\+ torchrun --nproc_per_node 2 .*eval.py .*--format charades_sta",
              r"\+ torchrun --nproc_per_node 2 .*eval.py .*--format nextgqa",
              r"\+ torchrun --nproc_per_node 2 .*eval.py .*--format rextime"]
    assert_in_order(out, stages)
    assert "DataError" not in out and "Traceback" not in p.stderr

    # The table: a row per benchmark and model, from the metrics eval.py wrote
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    world = json.loads((tmp_path / "world" / "world.json").read_text())
    for fmt, label in (("charades_sta", "Charades-STA"), ("nextgqa", "NExT-GQA"), ("rextime", "ReXTime")):
        assert "sft" not in res[fmt]
        for model in ("base", "grpo"):
            assert res[fmt][model]["n"] == world["bench"][fmt]  # every query answered and scored
            assert re.search(rf"^{label}\s+{model}\s+{world['bench'][fmt]}\s", out, re.M), (label, model)

    # Trained under ZeRO-3 on 2 ranks, and the final models are plain HF directories
    for stage in ("sft", "grpo"):
        cfg = json.loads((tmp_path / "run" / stage / "config.json").read_text())
        assert cfg["world"] == 2 and cfg["deepspeed"]["zero_optimization"]["stage"] == 3
        assert (tmp_path / "run" / stage / "model" / "config.json").is_file()
    assert len((tmp_path / "run" / "data" / "coldstart.jsonl").read_text().splitlines()) == world["coldstart"]

    # Only what the recipe reads came from the hub: no decoy archive, no Grounded-VideoLLM zip
    got = [json.loads(ln)["path"] for ln in (tmp_path / "world" / "requests.jsonl").read_text().splitlines()]
    files = [g.split("/resolve/main/", 1)[1] for g in got if "/resolve/" in g]
    assert "queryd/videos_3fps_480_noaudio.tar.gz" in files and "charades_sta/durations.json" in files
    assert not [f for f in files if "crop" in f or f.startswith(("queryd/videos.tar", "charades_sta/videos.tar",
                                                                   "activitynet/videos.tar", "cosmo_cap", "qvhighlights/chunk"))]
    assert not [g for g in got if "Grounded-VideoLLM" in g]


def test_paper_rehearsal_ablations(tmp_path):
    """ABLATIONS=1 bash run.sh paper --rehearsal: our own annotation (a Gemini stand-in answering from
    the dense captions with 30% deliberate mistakes), then rows of the paper's Tables 3 and 4 with the
    paper preset's own SFT and GRPO commands, each evaluated and added to the table."""
    # For the suite's time (each 2-rank launch costs ~20 s): two of the four rows, which between them
    # run every command the others do (SFT on the unfiltered cold start, GRPO from the base model, GRPO
    # on the unfiltered RL data), and the evals on Charades-STA only; base and the three benchmarks are
    # evaluated by the test above.
    env = dict(os.environ, REHEARSAL_DIR=str(tmp_path), ABLATIONS="1", ABLATION_ROWS="grpo_r1u zero_unfiltered",
               EVAL_MODELS="grpo", BENCHMARKS="charades_sta")
    p = subprocess.run(["bash", str(ROOT / "run.sh"), "paper", "--rehearsal"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
    out = p.stdout
    assert p.returncode == 0, out[-4000:] + p.stderr[-4000:]
    run = tmp_path / "run"
    stages = [r"\+ python data.py convert --format tvg_r1 --cot-field none --input .*train_raw.json",
              r"\+ python annotate.py .*--teacher gemini .*--base-url http://127.0.0.1:\d+",
              r"\+ python prepare.py check --data .*coldstart_unfiltered_all.jsonl",
              r"\+ deepspeed .*sft.py .*--data \S*/coldstart.jsonl --out \S*/sft ",
              r"\+ deepspeed .*grpo.py --model \S*/sft/model --data \S*/rl.jsonl --out \S*/grpo ",
              r"\+ deepspeed .*sft.py .*--data \S*/coldstart_unfiltered.jsonl --out \S*/sft_unfiltered ",
              r"\+ deepspeed .*grpo.py --model \S*/sft_unfiltered/model --data \S*/rl.jsonl --out \S*/grpo_r1u ",
              r"\+ deepspeed .*grpo.py --model \S*/base_model --data \S*/rl_unfiltered.jsonl --out \S*/zero_unfiltered "]
    assert_in_order(out, stages)

    # Every training sample was asked once; the split has all three parts, and the unfiltered sets are
    # the filtered ones plus what the filters drop
    world = json.loads((tmp_path / "world" / "world.json").read_text())
    asked = [json.loads(ln) for ln in (tmp_path / "world" / "requests.jsonl").read_text().splitlines()
             if ln.strip() and json.loads(ln)["method"] == "POST"]
    assert len(asked) == world["train_samples"] and all(r["status"] == 200 for r in asked)
    n = {f: len((run / "data" / f"{f}.jsonl").read_text().splitlines())
         for f in ("coldstart", "rl", "coldstart_unfiltered", "rl_unfiltered")}
    assert 0 < n["coldstart"] < n["coldstart_unfiltered"] <= world["train_samples"]
    assert 0 < n["rl"] < n["rl_unfiltered"]

    # Every row evaluated on the benchmark asked for, and in the table; the others not run
    res = json.loads((run / "results.json").read_text())
    for model in ("grpo", "grpo_r1u", "zero_unfiltered"):
        assert res["charades_sta"][model]["n"] == world["bench"]["charades_sta"], model
        assert re.search(rf"^Charades-STA\s+{model}\s+{world['bench']['charades_sta']}\s", out, re.M), model
    assert "nextgqa" not in res and "rextime" not in res and not (run / "eval" / "grpo" / "nextgqa").exists()
    for stage in ("sft_unfiltered", "grpo_r1u", "zero_unfiltered"):
        assert json.loads((run / stage / "config.json").read_text())["world"] == 2
    # the rows not asked for (ABLATION_ROWS) neither trained nor in the table
    assert not (run / "zero").exists() and not (run / "grpo_rl_unfiltered").exists()
    assert set(res["charades_sta"]) == {"grpo", "grpo_r1u", "zero_unfiltered", "grpo_official-0724",
                                        "grpo_r1u_official-0724", "zero_unfiltered_official-0724"}
