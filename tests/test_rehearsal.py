"""`bash run.sh paper --rehearsal`: the paper preset's own stage commands on a CPU, against a miniature of the
released world served by a local stand-in for the hub. The suite's one slow test (~3 minutes on 2 cores)."""
import json
import os
import re
import subprocess

from conftest import ROOT


def test_paper_rehearsal_runs_every_stage(tmp_path):
    env = dict(os.environ, REHEARSAL_DIR=str(tmp_path))
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
    pos = 0
    for pattern in stages:
        m = re.compile(pattern).search(out, pos)
        assert m, f"stage missing or out of order: {pattern}"
        pos = m.end()
    assert "DataError" not in out and "Traceback" not in p.stderr

    # The table: a row per benchmark and model, from the metrics eval.py wrote
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    world = json.loads((tmp_path / "world" / "world.json").read_text())
    for fmt, label in (("charades_sta", "Charades-STA"), ("nextgqa", "NExT-GQA"), ("rextime", "ReXTime")):
        for model in ("base", "sft", "grpo"):
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
