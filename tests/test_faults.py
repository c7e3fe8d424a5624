"""Faults tried on purpose, stage by stage, against uninterrupted runs: kill -9 at seeded moments
(annotate, SFT, GRPO, eval; one rank of a 2-rank run; during a checkpoint write; torn JSONL lines),
bad input through every stage's reader, NaN steps, a full disk, a misbehaving teacher.

The scripts run as `python SCRIPT ...` would (the file as __main__), each in a process forked from a
warm server (tests/forked.py): a start costs ~1 s, so a dozen kills fit in the suite's budget. The
only stand-in is the teachers' HTTP API (tests/fake_servers.py). The README's Reliability table counts
what this file tries."""
import json
import math
import random
import re
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import annotate
import data
import eval as ev
import grpo
import model
import sft
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES
from fake_servers import CUT, EMPTY, ERROR_BODY, MALFORMED, FakeTeacher
from forked import Run, context
from test_sft import make_coldstart

VIDEO = ["--nframes", NFRAMES, "--max-pixels", MAX_PIXELS, "--min-pixels", MIN_PIXELS]
SFT = VIDEO + ["--lr", "1e-3", "--batch-size", 2, "--max-steps", 8, "--save-every", 2]  # as tests/test_sft.py
GRPO = VIDEO + ["--group-size", 4, "--prompts-per-step", 2, "--max-new-tokens", 16, "--steps", 6, "--save-every", 2,
                "--entropy-coef", 0.5, "--lr", "1e-3", "--log-rollouts", 3]  # as tests/test_grpo.py
EVAL = VIDEO + ["--max-new-tokens", 16, "--cases", 0]
KEY = "gk-test-SECRET-gemini-faults-0123"
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def warm():
    context()  # the fork server: torch, transformers, DeepSpeed and the scripts imported once (~6 s)


@pytest.fixture(scope="module")
def cold(synth_dir, tmp_path_factory):
    return make_coldstart(synth_dir / "train.jsonl", tmp_path_factory.mktemp("faults") / "coldstart.jsonl")


def finished(script, args, log, **kw) -> Run:
    run = Run(script, args, log, **kw)
    assert run.wait() == [0] * len(run.procs), run.text()[-4000:]
    return run


def uninterrupted(tmp_path_factory, script: str, model_dir, data_path, flags) -> Path:
    """A run from start to end, untouched: what each run with faults must end with."""
    out = tmp_path_factory.mktemp(Path(script).stem) / "run"
    finished(script, ["--model", model_dir, "--data", data_path, "--out", out, *flags], out.parent / "log")
    return out


@pytest.fixture(scope="module")
def sft_ref(warm, tiny_model_dir, cold, tmp_path_factory):
    return uninterrupted(tmp_path_factory, "sft.py", tiny_model_dir, cold, SFT)


@pytest.fixture(scope="module")
def grpo_ref(warm, tiny_model_dir, synth_dir, tmp_path_factory):
    return uninterrupted(tmp_path_factory, "grpo.py", tiny_model_dir, synth_dir / "train.jsonl", GRPO)


@pytest.fixture(scope="module")
def eval_ref(warm, tiny_model_dir, synth_dir, tmp_path_factory):
    return uninterrupted(tmp_path_factory, "eval.py", tiny_model_dir, synth_dir / "train.jsonl", EVAL)


# -----------------------------------------------------------------------------
# Helpers: moments to kill at, torn lines, comparisons


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def weights(d: Path) -> dict:
    return load_file(d / "model.safetensors")


def logged(out: Path, name: str = "metrics.jsonl") -> int:
    """Complete lines of a log (a torn last line does not count)."""
    p = out / name
    return p.read_bytes().count(b"\n") if p.exists() else 0


def writing(out: Path, step: int):
    """A moment: checkpoint-STEP is being written (its directory, or save_hf's .tmp, exists; it is not complete)."""
    name = f"checkpoint-{step:06d}"
    return lambda: any(p.name.startswith(name) for p in out.iterdir()) if out.is_dir() else False


def kill_at(run: Run, moment, rng: random.Random, rank=None, jitter: float = 0.03) -> None:
    """SIGKILL when `moment()` comes, after a seeded random wait of up to `jitter` seconds."""
    run.until(moment)
    time.sleep(rng.uniform(0, jitter))
    run.kill(rank)
    codes = [p.exitcode for r, p in enumerate(run.procs) if rank is None or r == rank]
    assert codes == [KILLED] * len(codes), f"the run ended before the kill: {codes}\n{run.text()[-3000:]}"


def tear(path: Path, rng: random.Random, keep_all: bool = False) -> None:
    """Replace the last line of an append-only log by a prefix of itself, without its newline: what a
    kill in the middle of that append leaves. keep_all: the whole line but its newline (it parses)."""
    raw = path.read_bytes()
    start = raw.rstrip(b"\n").rfind(b"\n") + 1  # where the last line starts
    last = raw[start:].rstrip(b"\n")
    path.write_bytes(raw[:start] + last[:len(last) if keep_all else rng.randrange(1, len(last))])


def same_weights(a: Path, b: Path, rtol=1e-6, atol=1e-7) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=rtol, atol=atol, msg=k)


def same_sft_log(ref: Path, out: Path, rel=1e-6) -> None:
    """Each step logged once, in order, with the uninterrupted run's loss."""
    a, b = lines(ref / "metrics.jsonl"), lines(out / "metrics.jsonl")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, len(a) + 1))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=rel), x["step"]


# -----------------------------------------------------------------------------
# kill -9 anywhere (and a full disk): every resumed run ends where the uninterrupted one did


def test_sft_kill9_anywhere_and_a_full_disk(sft_ref, tiny_model_dir, cold, tmp_path):
    rng = random.Random(1)
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--data", cold, "--out", out, *SFT]

    # (a) a seeded moment after step 1 (model loaded, training)
    kill_at(Run("sft.py", args, tmp_path / "a.log"), lambda: logged(out) >= 1, rng)
    # (b) while checkpoint-000004 is being written
    r = Run("sft.py", args + ["--resume"], tmp_path / "b.log")
    kill_at(r, writing(out, 4), rng, jitter=0.0)
    assert not (out / "checkpoint-000004" / "trainer_state.json").exists()
    assert model.latest_checkpoint(str(out)).endswith("checkpoint-000002"), r.text()[-2000:]
    # (c) a seeded moment after step 5, and the metrics line being appended then torn
    kill_at(Run("sft.py", args + ["--resume"], tmp_path / "c.log"), lambda: logged(out) >= 5, rng)
    tear(out / "metrics.jsonl", rng)

    # (d) the disk fills up: no file may grow past 64 KiB (RLIMIT_FSIZE, no root needed; the tmpfs test
    # below is the real thing). Writing the next checkpoint fails, the error names it, the last complete
    # one stays and is what the next --resume continues from.
    last = model.latest_checkpoint(str(out))
    r = Run("sft.py", args + ["--resume"], tmp_path / "d.log", max_file_bytes=64 * 1024)
    assert r.wait() == [1]
    assert f"error: could not write the checkpoint {out}/checkpoint-" in r.text() and "--resume" in r.text()
    assert "Traceback" not in r.text()
    assert model.latest_checkpoint(str(out)) == last
    assert all((p / "trainer_state.json").exists() for p in out.glob("checkpoint-*"))  # the partial one is gone

    r = finished("sft.py", args + ["--resume"], tmp_path / "e.log")
    assert f"resumed from {last}" in r.text()
    same_weights(sft_ref / "model", out / "model")
    same_sft_log(sft_ref, out)


def test_sft_kill_one_rank_of_two(sft_ref, tiny_model_dir, cold, tmp_path):
    """2-process ZeRO-3: rank 1 is killed at a seeded moment, then rank 0 (as torchrun's agent would);
    resumed on 2 ranks, the run ends with the 1-process run's weights (the 2-rank tolerance of test_sft)."""
    rng = random.Random(2)
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--data", cold, "--out", out, *SFT, "--zero-stage", 3]
    r = Run("sft.py", args, tmp_path / "a.log", nproc=2)
    kill_at(r, lambda: logged(out) >= 3, rng, rank=1)
    r.kill()
    assert not (out / "model").exists()
    r = Run("sft.py", args + ["--resume"], tmp_path / "b.log", nproc=2)
    assert r.wait() == [0, 0], r.text()[-4000:]
    same_weights(sft_ref / "model", out / "model", rtol=1e-4, atol=1e-5)
    same_sft_log(sft_ref, out, rel=1e-5)


def test_grpo_kill9_anywhere(grpo_ref, tiny_model_dir, synth_dir, tmp_path):
    rng = random.Random(3)
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--data", synth_dir / "train.jsonl", "--out", out, *GRPO]
    kill_at(Run("grpo.py", args, tmp_path / "a.log"), lambda: logged(out) >= 1, rng)
    kill_at(Run("grpo.py", args + ["--resume"], tmp_path / "b.log"), writing(out, 4), rng, jitter=0.0)
    assert not (out / "checkpoint-000004" / "trainer_state.json").exists()
    kill_at(Run("grpo.py", args + ["--resume"], tmp_path / "c.log"), lambda: logged(out) >= 5, rng)
    for name in ("metrics.jsonl", "rollouts.jsonl"):  # both appends torn by the kill
        tear(out / name, rng)
    finished("grpo.py", args + ["--resume"], tmp_path / "d.log")
    a, b = lines(grpo_ref / "metrics.jsonl"), lines(out / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):  # the same rollouts (sampling RNG restored), the same updates
        assert (x["reward"], x["length"]) == (y["reward"], y["length"])
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
    assert [(r["step"], r["response"]) for r in lines(out / "rollouts.jsonl")] == \
        [(r["step"], r["response"]) for r in lines(grpo_ref / "rollouts.jsonl")]
    same_weights(grpo_ref / "model", out / "model", rtol=0, atol=1e-6)


def test_eval_kill9_anywhere(eval_ref, tiny_model_dir, synth_dir, tmp_path):
    rng = random.Random(4)
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--data", synth_dir / "train.jsonl", "--out", out, *EVAL]
    rank0 = "predictions.rank0.jsonl"
    kill_at(Run("eval.py", args, tmp_path / "a.log"), lambda: logged(out, rank0) >= 3, rng)
    kill_at(Run("eval.py", args, tmp_path / "b.log"), lambda: logged(out, rank0) >= 7, rng)
    # a kill can stop a buffered write just before the newline: the line parses, yet it is torn
    tear(out / rank0, rng, keep_all=True)
    done = logged(out, rank0)  # the torn answer is not among them: it is asked again
    r = finished("eval.py", args, tmp_path / "c.log")
    assert f"{done} already answered" in r.text()
    assert (out / "predictions.jsonl").read_text() == (eval_ref / "predictions.jsonl").read_text()
    assert json.loads((out / "metrics.json").read_text()) == json.loads((eval_ref / "metrics.json").read_text())


def test_eval_kill_one_rank_of_two(eval_ref, tiny_model_dir, synth_dir, tmp_path):
    rng = random.Random(5)
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--data", synth_dir / "train.jsonl", "--out", out, *EVAL]
    r = Run("eval.py", args, tmp_path / "a.log", nproc=2)
    kill_at(r, lambda: logged(out, "predictions.rank1.jsonl") >= 2, rng, rank=1)
    r.kill()
    r = Run("eval.py", args, tmp_path / "b.log", nproc=2)
    assert r.wait() == [0, 0], r.text()[-4000:]
    ids = [d["id"] for d in lines(out / "predictions.jsonl")]
    assert len(ids) == len(set(ids)) == 12
    assert (out / "predictions.jsonl").read_text() == (eval_ref / "predictions.jsonl").read_text()
    assert json.loads((out / "metrics.json").read_text()) == json.loads((eval_ref / "metrics.json").read_text())


def annotations_by_id(out: Path) -> dict:
    """What the cache says about each sample, without the timings."""
    return {r["id"]: {k: r[k] for k in ("status", "response", "span", "iou", "tokens", "teacher", "model")}
            for r in lines(out / "annotations.jsonl")}


def test_annotate_kill9_anywhere(warm, synth_dir, tmp_path, monkeypatch):
    """Three kills at seeded moments and a torn line: the same annotations as an uninterrupted run, no
    request repeated for a sample once its line is written, each sample on exactly one line."""
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    rng = random.Random(6)
    base = data.read_jsonl(synth_dir / "train.jsonl")
    samples = [replace(s, id=f"s{k}", query=f"query {k}: {s.query}", duration=None) for k, s in enumerate(base)]
    path = tmp_path / "train.jsonl"
    data.write_jsonl(path, samples)
    answers = {s.query: f"<think>It moves.</think> <time>[{k}.00, {k + 4}.50]</time>" for k, s in enumerate(samples)}
    flags = ["--data", path, "--teacher", "gemini", "--concurrency", 2]
    with FakeTeacher() as fake:
        fake.answers.update(answers)
        annotate.main([str(f) for f in flags + ["--base-url", fake.url, "--out", tmp_path / "whole"]])
    out = tmp_path / "killed"
    with FakeTeacher() as fake:
        fake.answers.update(answers)
        for s in samples:  # a slower teacher: the kills land among requests in flight
            fake.script[s.query] = [("sleep", 0.1)]
        args = flags + ["--base-url", fake.url, "--out", out]
        query = {s.id: s.query for s in samples}
        paid, runs = {}, []  # sample id -> requests made for it when its line was first seen written
        for k in (2, 5, 8):
            runs.append(Run("annotate.py", args, tmp_path / f"{k}.log", env={"GEMINI_API_KEY": KEY}))
            kill_at(runs[-1], lambda: logged(out, "annotations.jsonl") >= k, rng, jitter=0.05)
            if k == 5:
                tear(out / "annotations.jsonl", rng)  # the kill came in the middle of an append
            for _, rec in data.json_lines(out / "annotations.jsonl", complete_only=True):
                paid.setdefault(rec["id"], fake.counts[query[rec["id"]]])
        runs.append(finished("annotate.py", args, tmp_path / "end.log", env={"GEMINI_API_KEY": KEY}))
        counts = dict(fake.counts)
    assert "dropping an unfinished last line" in runs[2].text()
    assert all(KEY not in r.text() for r in runs) and KEY not in (out / "annotations.jsonl").read_text()
    got = annotations_by_id(out)
    assert len(lines(out / "annotations.jsonl")) == len(got) == len(samples)  # no line lost or repeated
    assert got == annotations_by_id(tmp_path / "whole")
    assert {i: counts[query[i]] for i in paid} == paid  # a written answer is never asked for again
    for name in ("coldstart.jsonl", "rl.jsonl"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text()


def test_a_torn_last_line_is_dropped_and_any_other_bad_line_is_named(tmp_path):
    """The readers behind every resume, on the logs a kill leaves: a torn last line (a prefix of a
    record, or the whole record without its newline) is dropped; a bad line before it is an error."""
    rec = [{"step": k, "loss": 1.0 / k} for k in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rec)
    log = tmp_path / "metrics.jsonl"
    for torn in ('{"step": 4, "lo', json.dumps({"step": 4, "loss": 0.2})):  # a fragment; a record without "\n"
        log.write_text(text + torn)
        model.keep_steps_upto(str(log), 3)  # resuming at a checkpoint of step 3: the torn step 4 is redone
        assert log.read_text() == text
    log.write_text(text.replace('{"step": 2', '{"step": 2,,', 1))
    with pytest.raises(data.DataError, match=rf"{log}:2: not valid JSON"):
        model.keep_steps_upto(str(log), 3)
    # eval's rank files: an answer whose newline never came is asked again, not merged
    ans = [{"id": f"q{k}", "gt": [[0, 1]], "response": "<time>[0, 1]</time>"} for k in (1, 2)]
    (tmp_path / "predictions.rank0.jsonl").write_text(json.dumps(ans[0]) + "\n" + json.dumps(ans[1]))
    assert list(ev.read_done(tmp_path)) == ["q1"]
    # annotate's cache: the fragment is cut off before the next append
    cache = tmp_path / "annotations.jsonl"
    good = json.dumps(dict(id="a", source="", teacher="captions", model="m", status="ok", response="r",
                           span=[0, 1], iou=1.0))
    cache.write_text(good + "\n" + good[:30])
    assert [r.id for r in annotate.load_annotations(cache)] == ["a"] and cache.read_text() == good + "\n"


# -----------------------------------------------------------------------------
# NaN and inf: the step is skipped on every rank, logged and counted; too many in a row stop the run


def checkpoint_weights(out: Path) -> dict[int, dict]:
    return {int(p.name.split("-")[1]): weights(p) for p in sorted(out.glob("checkpoint-*"))}


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_nan_steps_are_skipped_counted_then_stop(warm, tiny_model_dir, cold, tmp_path):
    """ZeRO-0 (a plain torch AdamW, which has no NaN check of its own): steps 3, 6 and 7 get a NaN loss."""
    out = tmp_path / "run"
    r = Run("sft.py", ["--model", tiny_model_dir, "--data", cold, "--out", out, *SFT[:-2], "--save-every", 1,
                       "--keep-checkpoints", 9, "--inject-nan", "3,6,7", "--max-bad-steps", 2], tmp_path / "log")
    assert r.wait() == [1]
    log = r.text()
    assert "step 3/8 | loss nan" in log and "step skipped (1 in a row, 1 in all)" in log
    assert "2 steps in a row (steps 6 to 7) had a NaN or inf loss or gradient" in log and "--max-bad-steps 2" in log
    assert "the last checkpoint is " + str(out / "checkpoint-000006") in log
    rows = lines(out / "metrics.jsonl")
    assert [(x["step"], x["bad_step"], x["bad_steps"]) for x in rows] == [
        (1, False, 0), (2, False, 0), (3, True, 1), (4, False, 1), (5, False, 1), (6, True, 2), (7, True, 3)]
    assert all(math.isfinite(x["loss"]) for x in rows if not x["bad_step"])  # no NaN gradient left behind
    w = checkpoint_weights(out)
    assert sorted(w) == [1, 2, 3, 4, 5, 6]  # stopped at 7, before its checkpoint
    assert all(torch.isfinite(t).all() for ws in w.values() for t in ws.values())  # never a NaN weight
    assert_equal(w[2], w[3])  # the skipped step changed no weight ...
    assert_equal(w[5], w[6])
    assert not torch.equal(w[3]["lm_head.weight"], w[4]["lm_head.weight"])  # ... and the next one trains
    # ... nor Adam's moments: the optimizer state after step 3 is the one after step 2
    opt = [torch.load(out / f"checkpoint-00000{k}" / "ds" / "state" / "mp_rank_00_model_states.pt",
                      weights_only=False)["optimizer"]["state"] for k in (2, 3)]
    assert opt[0].keys() == opt[1].keys() and all(
        torch.equal(opt[0][i][m], opt[1][i][m]) for i in opt[0] for m in ("exp_avg", "exp_avg_sq"))


def test_sft_nan_on_one_rank_is_skipped_by_both_zero3(warm, tiny_model_dir, cold, tmp_path):
    """2-process ZeRO-3: rank 0's loss is NaN at step 2; rank 1's is fine. Both ranks skip the update
    together (a rank stepping alone would desynchronise the shards), and step 3 trains again."""
    out = tmp_path / "run"
    r = Run("sft.py", ["--model", tiny_model_dir, "--data", cold, "--out", out, *VIDEO, "--lr", "1e-3",
                       "--batch-size", 2, "--max-steps", 3, "--save-every", 1, "--keep-checkpoints", 3,
                       "--zero-stage", 3, "--inject-nan", 2], tmp_path / "log", nproc=2)
    assert r.wait() == [0, 0], r.text()[-4000:]
    assert [x["bad_step"] for x in lines(out / "metrics.jsonl")] == [False, True, False]
    w = checkpoint_weights(out)
    assert_equal(w[1], w[2])
    assert not torch.equal(w[2]["lm_head.weight"], w[3]["lm_head.weight"])
    assert all(torch.isfinite(t).all() for t in w[3].values())


def test_grpo_nan_steps_are_skipped_counted_then_stop(warm, tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    r = Run("grpo.py", ["--model", tiny_model_dir, "--data", synth_dir / "train.jsonl", "--out", out, *GRPO,
                        "--save-every", 1, "--inject-nan", "2,4,5", "--max-bad-steps", 2], tmp_path / "log")
    assert r.wait() == [1]
    log = r.text()
    assert "update skipped (1 step(s) in a row)" in log
    assert "2 steps in a row (steps 4 to 5) had a NaN or inf loss or gradient" in log
    rows = lines(out / "metrics.jsonl")
    assert [(x["step"], x["bad_steps"], x["opt_steps"]) for x in rows] == [
        (1, 0, 1), (2, 1, 0), (3, 0, 1), (4, 1, 0), (5, 1, 0)]
    assert rows[1]["grad_norm"] is None and math.isfinite(rows[2]["grad_norm"])  # step 3: no stale NaN gradient
    w = checkpoint_weights(out)
    assert sorted(w) == [3, 4] and all(torch.isfinite(t).all() for ws in w.values() for t in ws.values())
    assert_equal(w[3], w[4])


# -----------------------------------------------------------------------------
# A full disk on a real small filesystem (root only; the first test fills a "disk" without root)


def test_full_disk_tmpfs_keeps_the_last_checkpoint(sft_ref, tiny_model_dir, cold, tmp_path):
    ckpt = sft_ref / "checkpoint-000008"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    # room for one checkpoint and a half: the first one fits, the second cannot
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 + 256 * 1024}", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or 'mount failed'}); the disk-full path is "
                    "still covered by test_sft_kill9_anywhere_and_a_full_disk (a file size limit)")
    try:
        out = disk / "run"
        args = ["--model", tiny_model_dir, "--data", cold, "--out", out, *SFT]
        r = Run("sft.py", args, tmp_path / "a.log")
        assert r.wait() == [1]
        assert f"error: could not write the checkpoint {out}/checkpoint-000004" in r.text()
        assert "MiB free on its disk" in r.text() and "Traceback" not in r.text()
        assert model.latest_checkpoint(str(out)) == str(out / "checkpoint-000002")  # complete, kept
        assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000002"]  # the partial one is gone
        subprocess.run(["mount", "-o", f"remount,size={size * 4 + 1024 * 1024}", str(disk)], check=True)  # room made
        r = finished("sft.py", args + ["--resume"], tmp_path / "b.log")
        assert f"resumed from {out / 'checkpoint-000002'}" in r.text()
        same_weights(sft_ref / "model", out / "model")
        same_sft_log(sft_ref, out)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# -----------------------------------------------------------------------------
# Bad input: through the stage that reads it, an error naming the file:line or the sample and what is
# wrong, or with --skip-bad a skip that is counted and printed


def crlf_bom(path: Path, dest: Path) -> Path:
    """The same file as Windows tools write it: a UTF-8 BOM and CRLF line ends."""
    dest.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    return dest


@pytest.fixture(scope="module")
def bad_videos(synth_dir, tmp_path_factory):
    """kind -> a Sample whose video cannot serve it (found when the video is opened: the last one is a
    sample whose span starts after its own duration); and a clip shorter than the frames asked for."""
    import av
    import numpy as np
    d = tmp_path_factory.mktemp("bad_videos")
    good = data.read_jsonl(synth_dir / "train.jsonl")[0]
    raw = Path(good.video).read_bytes()
    (d / "zero.mp4").write_bytes(b"")
    (d / "cut.mp4").write_bytes(raw[:len(raw) // 2])  # the index (moov) is written last: lost
    rng = np.random.default_rng(0)
    with av.open(str(d / "fast.mp4"), "w", options={"movflags": "faststart"}) as f:  # index first, frames after
        st = f.add_stream("libx264", rate=4)
        st.width = st.height = 112
        for _ in range(40):  # noise: large frames, so half the file cuts into them
            f.mux(st.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))))
        f.mux(st.encode())
    raw = (d / "fast.mp4").read_bytes()
    (d / "fast_cut.mp4").write_bytes(raw[:len(raw) // 2])
    n = len(raw) // 2  # the index intact, 60 kB of frames zeroed: it opens, its frames do not decode
    (d / "damaged.mp4").write_bytes(raw[:n] + bytes(60_000) + raw[n + 60_000:])
    with av.open(str(d / "audio.mp4"), "w") as f:  # a valid mp4 with a sound track and no picture
        st = f.add_stream("aac", rate=16000)
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            f.mux(st.encode(frame))
        f.mux(st.encode())
    data.synth_video(str(d / "four.mp4"), 4, [], seed=0)  # 4 frames, 1 s
    end = good.duration
    bad = {"zero-byte": replace(good, id="zero", video=str(d / "zero.mp4")),
           "truncated, index last": replace(good, id="cut", video=str(d / "cut.mp4")),
           "truncated, index first": replace(good, id="fast_cut", video=str(d / "fast_cut.mp4")),
           "no video stream": replace(good, id="audio", video=str(d / "audio.mp4")),
           "damaged frames": replace(good, id="damaged", video=str(d / "damaged.mp4")),
           "shorter than its span": replace(good, id="late", duration=end + 30, spans=[[end + 10, end + 20]]),
           "a span outside the video": replace(good, id="outside", duration=end / 4, spans=[[end / 2, end / 2 + 1]])}
    short = replace(good, id="four", video=str(d / "four.mp4"), duration=1.0, spans=[[0.25, 0.75]])
    return bad, short


BAD_VIDEO_MESSAGES = {"zero-byte": "cannot decode video", "truncated, index last": "cannot decode video",
                      "truncated, index first": "cannot decode video", "no video stream": "cannot find video stream",
                      "damaged frames": "cannot decode the frames of video",
                      "shorter than its span": "s long (shorter than the annotation says)",
                      "a span outside the video": "s long (the sample's duration)"}


def test_bad_videos_are_named_by_the_reader_every_stage_uses(bad_videos):
    bad, short = bad_videos
    for kind, s in bad.items():
        with pytest.raises(data.DataError) as e:
            data.load_video(s, NFRAMES, MAX_PIXELS, MIN_PIXELS)
        assert str(e.value).startswith(f"sample {s.id}: ") and BAD_VIDEO_MESSAGES[kind] in str(e.value), kind
    # a clip of 4 frames, 16 asked for: every frame, each at its real time, so the positions stay right
    frames, meta = data.load_video(short, NFRAMES, MAX_PIXELS, MIN_PIXELS)
    assert frames.shape[0] == 4 and data.frame_times(meta) == [0.0, 0.25, 0.5, 0.75]


def test_bad_videos_through_sft_grpo_eval(warm, bad_videos, tiny_model_dir, tmp_path):
    bad, short = bad_videos
    goods = [short, replace(short, id="four_again")]
    samples = [replace(s, cot="It moves.", answer=s.spans[0]) for s in [*goods, *bad.values()]]
    cold = tmp_path / "cold.jsonl"
    data.write_jsonl(cold, samples)
    # SFT: found when first decoded, mid-run (an epoch of steps of 1 meets them all); --skip-bad
    # replaces each, counts and prints it
    r = finished("sft.py", ["--model", tiny_model_dir, "--data", cold, "--out", tmp_path / "sft", *VIDEO,
                            "--batch-size", 1, "--max-steps", len(samples), "--skip-bad"], tmp_path / "sft.log")
    for kind, s in bad.items():
        assert f"(sample {s.id}): sample {s.id}: " in r.text() and BAD_VIDEO_MESSAGES[kind] in r.text(), kind
    assert lines(tmp_path / "sft" / "metrics.jsonl")[-1]["skipped"] == len(bad) and f"| skipped {len(bad)}" in r.text()
    r = Run("sft.py", ["--model", tiny_model_dir, "--data", cold, "--out", tmp_path / "sft2", *VIDEO,  # without it:
                       "--batch-size", len(samples), "--max-steps", 1], tmp_path / "sft2.log")  # the first one stops it
    assert r.wait() == [1] and re.search(rf"error: {cold}:\d \(sample (\w+)\): sample \1: ", r.text())
    # GRPO: every sample is a prompt of the step; --skip-bad replaces each bad one by a readable one
    r = finished("grpo.py", ["--model", tiny_model_dir, "--data", cold, "--out", tmp_path / "grpo", *VIDEO,
                             "--group-size", 2, "--prompts-per-step", len(samples), "--max-new-tokens", 4,
                             "--steps", 1, "--skip-bad"], tmp_path / "grpo.log")
    assert lines(tmp_path / "grpo" / "metrics.jsonl")[0]["skipped_videos"] == len(bad)
    assert all(f"sample {s.id}: sample {s.id}: " in r.text() for s in bad.values())
    # eval: no answer is made up for a video it cannot read
    r = Run("eval.py", ["--model", tiny_model_dir, "--data", cold, "--out", tmp_path / "eval", *EVAL],
            tmp_path / "eval.log")
    assert r.wait() == [2] and "error: sample zero: cannot decode video" in r.text()


def test_bad_videos_through_annotate(bad_videos, tmp_path, monkeypatch, capsys):
    """Named in the failed record and counted in the summary; no request is paid for them."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused")
    monkeypatch.setenv("GEMINI_API_KEY", "gk-unused")
    bad, short = bad_videos
    path = tmp_path / "train.jsonl"
    data.write_jsonl(path, [short, *bad.values()])
    n = 1 + len(bad)
    with FakeTeacher() as fake:
        fake.answers[short.query] = "<think>It moves.</think> <time>[0.25, 0.75]</time>"
        for teacher in ("openai", "gemini"):
            out = tmp_path / teacher
            annotate.main(["--data", str(path), "--teacher", teacher, "--model", "m", "--out", str(out),
                           *map(str, VIDEO), "--base-url", fake.url + ("/v1" if teacher == "openai" else "")])
            recs = {r["id"]: r for r in lines(out / "annotations.jsonl")}
            assert recs["four"]["status"] == "ok"
            for kind, s in bad.items():
                assert recs[s.id]["status"] == "failed" and BAD_VIDEO_MESSAGES[kind] in recs[s.id]["error"], kind
            assert f"all    | {n:>6} |         1 |      0 |       0 | {len(bad):>6} |" in capsys.readouterr().out
        assert fake.counts[short.query] == 2 and sum(fake.counts.values()) == 2  # one request per teacher


BASE = {"id": "b", "video": "v.mp4", "duration": 30.0, "query": "when does the red circle appear?",
        "spans": [[3.0, 9.5]], "cot": "It moves.", "answer": [3.0, 9.0]}
BAD_LINES = [  # (what, line 2 of the file, what the error says)
    ("duration 0", json.dumps(dict(BASE, duration=0)), "duration must be positive"),
    ("negative duration", json.dumps(dict(BASE, duration=-4)), "duration must be positive"),
    ("NaN in a span", json.dumps(dict(BASE, spans=[[1, float("nan")]])), "span times must be finite"),
    ("inf in a span", json.dumps(dict(BASE, spans=[[1, float("inf")]])), "span times must be finite"),
    ("span written as strings", json.dumps(dict(BASE, spans=[["3.0", "9.5"]])), "span times must be numbers"),
    ("reversed span", json.dumps(dict(BASE, spans=[[9.5, 3]])), "starts after it ends"),
    ("duplicate id", json.dumps(dict(BASE, id="a")), "duplicate sample id"),
    ("an array, not an object", json.dumps([BASE]), "expected a JSON object, got list"),
    ("non-UTF-8 bytes", json.dumps(BASE).replace("red", "r\udcffd"), "not UTF-8 text (byte 0xff at column"),
    ("a query of 100,000 characters", json.dumps(dict(BASE, query="x" * 100_000)), "100,000 characters long"),
    ("an empty query", json.dumps(dict(BASE, query=" ")), "the query must be non-empty text"),
    ("a torn line", json.dumps(BASE)[:40], "not valid JSON"),
]


@pytest.mark.parametrize("what, line, message", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_lines_are_named_by_every_stage(what, line, message, synth_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    video = json.dumps(str(synth_dir / "videos" / "synth00000.mp4"))  # sft.py checks that it exists
    text = json.dumps(dict(BASE, id="a")) + "\n" + line + "\n"
    path.write_bytes(text.replace('"v.mp4"', video).encode("utf-8", "surrogateescape"))
    where = f"{path}:2"
    for stage in (lambda: annotate.main(["--data", str(path), "--teacher", "captions", "--out", str(tmp_path / "a")]),
                  lambda: grpo.main(["--model", "m", "--data", str(path), "--out", str(tmp_path / "g")]),
                  lambda: sft.read_coldstart(str(path), skip_bad=False)):
        with pytest.raises(data.DataError) as e:
            stage()
        assert str(e.value).startswith(where) and message in str(e.value)
    good, skipped = sft.read_coldstart(str(path), skip_bad=True)  # sft.py --skip-bad: counted, printed
    assert [x.sample.id for x in good] == ["a"] and len(skipped) == 1 and skipped[0].startswith(where)
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", "m", "--data", str(path), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {where}") and message in err and "Traceback" not in err


def test_crlf_and_bom_read_as_the_plain_files(synth_dir, cold, tmp_path):
    """Every reader, on the same content written by a Windows tool: the same records."""
    for read in (data.read_jsonl, lambda p: [e.sample for e in sft.read_coldstart(str(p), skip_bad=False)[0]]):
        plain = cold if read is not data.read_jsonl else synth_dir / "train.jsonl"
        assert read(crlf_bom(plain, plain.parent / f"crlf_{plain.name}")) == read(plain)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": f"q{k}", "gt": [[0, 4]], "response": f"<time>[0, {k}]</time>"}) + "\n"
                             for k in range(1, 4)))
    assert ev.read_predictions(crlf_bom(preds, tmp_path / "p2.jsonl")) == ev.read_predictions(preds)
    ASSETS = Path(__file__).resolve().parent.parent / "assets"
    txt = tmp_path / "charades.txt"
    txt.write_text("".join((ASSETS / "charades_sta" / "charades_sta_test.txt").read_text().splitlines(True)[:20]))
    rex = tmp_path / "rextime.jsonl"
    rex.write_text("".join((ASSETS / "rextime" / "rextime_val.jsonl").read_text().splitlines(True)[:20]))
    for fmt, p in (("charades_sta", txt), ("rextime", rex)):
        other = crlf_bom(p, tmp_path / f"w_{p.name}")
        assert [replace(s, video="") for s in data.read_benchmark(fmt, other)] == \
            [replace(s, video="") for s in data.read_benchmark(fmt, p)]
    csv = {}  # a CSV from a spreadsheet: the BOM would otherwise rename its first column
    for kind in ("plain", "windows"):
        (tmp_path / kind).mkdir()
        for name in ("gsub_test.json", "map_vid_vidorID.json"):
            (tmp_path / kind / name).symlink_to(ASSETS / "nextgqa" / name)
        csv[kind] = tmp_path / kind / "test.csv"
    csv["plain"].write_text("".join((ASSETS / "nextgqa" / "test.csv").read_text().splitlines(True)[:20]))
    crlf_bom(csv["plain"], csv["windows"])
    assert [replace(s, video="") for s in data.read_nextgqa(csv["windows"])] == \
        [replace(s, video="") for s in data.read_nextgqa(csv["plain"])]


def test_eval_score_refuses_a_nan_a_repeated_id_and_bad_bytes(tmp_path):
    ok = {"id": "a", "gt": [[0, 4]], "response": "<time>[0, 2]</time>"}
    for line, message in ((json.dumps(dict(ok, id="b", gt=[[0, float("nan")]])), "each gt span must be finite"),
                          (json.dumps(dict(ok, pred=[0, float("inf")], response=None)), "pred must be finite"),
                          (json.dumps(ok), "id 'a' appears again"),
                          (b'{"id": "\xff"}', "not UTF-8 text")):
        f = tmp_path / "preds.jsonl"
        f.write_bytes(json.dumps(ok).encode() + b"\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n")
        with pytest.raises(data.DataError) as e:
            ev.read_predictions(f)
        assert str(e.value).startswith(f"{f}:2") and message in str(e.value)


# -----------------------------------------------------------------------------
# A teacher that misbehaves: retried with backoff, then recorded as failed and counted; a re-run
# retries those only; the key is never written or printed

MISBEHAVIOURS = {"malformed JSON": MALFORMED, "empty content": EMPTY, "200 with an error body": ERROR_BODY,
                 "connection closed mid-answer": CUT, "hangs past the timeout": ("sleep", 1.2)}


@pytest.mark.parametrize("teacher", ["openai", "gemini"])
def test_misbehaving_teacher(teacher, synth_dir, tmp_path, monkeypatch, capsys, caplog):
    key = f"sk-test-SECRET-{teacher}-faults"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("GEMINI_API_KEY", key)
    base = data.read_jsonl(synth_dir / "train.jsonl")[0]
    # per misbehaviour: one sample it hits once (then the answer comes), one it hits every time
    samples = [replace(base, id=f"{k}{n}", query=f"{k} {what}", duration=None)
               for n, what in enumerate(MISBEHAVIOURS) for k in ("once", "always")]
    path = tmp_path / "train.jsonl"
    data.write_jsonl(path, samples)
    out = tmp_path / "out"
    flags = ["--data", str(path), "--teacher", teacher, "--model", "m", "--out", str(out), "--concurrency", "10",
             "--retries", "2", "--backoff", "0.2", "--timeout", "0.6", *map(str, VIDEO)]
    with FakeTeacher() as fake:
        flags += ["--base-url", fake.url + ("/v1" if teacher == "openai" else "")]
        for s in samples:
            fake.answers[s.query] = data.format_answer("It moves.", base.spans[0])
            what = MISBEHAVIOURS[s.query.split(" ", 1)[1]]
            fake.script[s.query] = [what] * (1 if s.id.startswith("once") else 9)
        annotate.main(flags)
        first = capsys.readouterr()
        recs = {r["id"]: r for r in lines(out / "annotations.jsonl")}
        for s in samples:
            if s.id.startswith("once"):  # retried, then answered
                assert fake.counts[s.query] == 2 and recs[s.id]["status"] == "ok", s.query
            else:  # 1 + --retries 2 tries, then recorded as failed; the next sample went on
                assert fake.counts[s.query] == 3 and recs[s.id]["status"] == "failed", s.query
                t = fake.times[s.query]
                assert t[1] - t[0] >= 0.1 and t[2] - t[1] >= 0.2  # backoff 0.2 s, doubled, jitter 0.5-1x
        assert "all    |     10 |         5 |      0 |       0 |      5 |" in first.out
        assert "0 malformed answer(s), kept with IoU 0, + 5 request(s) that gave up" in first.out
        # the re-run asks for the failed samples only (the teacher behaves now)
        before = dict(fake.counts)
        for s in samples:
            fake.script[s.query] = []
        annotate.main(flags)
        again = capsys.readouterr()
        assert {s.id: fake.counts[s.query] - before[s.query] for s in samples} == \
            {s.id: int(s.id.startswith("always")) for s in samples}
        assert "10 samples, 5 cached, 5 to annotate" in again.out
        assert any(key in json.dumps(h) for h in fake.headers)  # the key was in use ...
    for text in [first.out, first.err, again.out, again.err, caplog.text] + [p.read_text() for p in out.iterdir()]:
        assert key not in text  # ... and is nowhere in what we print, log or write
