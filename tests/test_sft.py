"""sft.py: the label mask token by token, the logits-only-where-labelled loss against the model's own,
bad input, and the real script run small as a user runs it: the loss falls when overfitting, a
2-process ZeRO-3 run equals a 1-process run, kill-and-resume equals an uninterrupted run, and the
saved model reloads and generates, and with --freeze-vision the kept vision outputs train as encoding
every time (1 process and 2-process ZeRO-3)."""
import json
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import forked
import model
import sft
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES

VIDEO = ["--nframes", str(NFRAMES), "--max-pixels", str(MAX_PIXELS), "--min-pixels", str(MIN_PIXELS)]


def make_coldstart(src, path, n=None):
    """Cold-start samples from synthetic ones: cot from the dense captions, answer = the GT span."""
    samples = data.read_jsonl(src)[:n]
    for s in samples:
        s.cot = " ".join(f"From {c['start']:.2f} s to {c['end']:.2f} s {c['text']}." for c in s.captions)
        s.answer = s.spans[0]
    data.write_jsonl(path, samples)
    return path


@pytest.fixture(scope="module")
def coldstart(synth_dir, tmp_path_factory):
    return make_coldstart(synth_dir / "train.jsonl", tmp_path_factory.mktemp("cold") / "coldstart.jsonl")


def run_sft(flags, nproc=1, check=True):
    """`python sft.py FLAGS` (nproc > 1: as torchrun's ranks), started by tests/forked.py."""
    r = forked.run("sft.py", [*flags, *VIDEO], nproc=nproc, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


# -----------------------------------------------------------------------------
# Labels and loss, in process


def test_labels_are_exactly_the_answer_and_its_end_token(tiny_model_dir, coldstart):
    processor = model.load_processor(tiny_model_dir)
    tok = processor.tokenizer
    examples, bad = sft.read_coldstart(str(coldstart), skip_bad=False)
    assert not bad and len(examples) == 12
    exs = [examples[0], examples[4], examples[8]]  # different videos and answer lengths -> padding
    assert exs[0].target == data.format_answer(exs[0].sample.cot, exs[0].sample.answer)
    assert exs[0].target.startswith("<think>From ") and exs[0].target.endswith("</think> <time>[3.25, 7.50]</time>")
    im_end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    for side in ("right", "left"):
        inp = data.build_inputs(processor, [e.sample for e in exs], answers=[e.target for e in exs], nframes=NFRAMES,
                                max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, padding_side=side)
        ids = inp["input_ids"]
        labels = sft.make_labels(ids, tok)
        assert (inp["attention_mask"] == 0).any()  # the batch really is padded
        for b, ex in enumerate(exs):
            on = (labels[b] != sft.IGNORE).nonzero().flatten().tolist()
            assert on == list(range(on[0], on[-1] + 1))  # one contiguous run
            assert labels[b, on].tolist() == ids[b, on].tolist()
            assert tok.decode(ids[b, on]) == ex.target + "<|im_end|>"  # token by token: the answer, then stop
            assert ids[b, on[-1]] == im_end
            # just before: the unlabelled assistant header; everything else is masked
            assert tok.decode(ids[b, :on[0]]).endswith("<|im_start|>assistant\n")
            assert not (labels[b] == processor.video_token_id).any()
            assert (labels[b][ids[b] == processor.video_token_id] == sft.IGNORE).all()
            assert (labels[b][inp["attention_mask"][b] == 0] == sft.IGNORE).all()
            assert not (labels[b] == pad).any()
    # a prompt without an answer (generation prompt only) has nothing to learn: refuse loudly
    gen = data.build_inputs(processor, [exs[0].sample], nframes=NFRAMES, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    with pytest.raises(ValueError, match="im_end"):
        sft.make_labels(gen["input_ids"], tok)


def test_loss_on_labelled_positions_only_equals_the_models_own_loss(tiny_model_dir, coldstart):
    processor = model.load_processor(tiny_model_dir)
    m = model.load_model(tiny_model_dir).eval()
    examples, _ = sft.read_coldstart(str(coldstart), skip_bad=False)
    exs = [examples[1], examples[5]]
    inp = data.build_inputs(processor, [e.sample for e in exs], answers=[e.target for e in exs], nframes=NFRAMES,
                            max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, padding_side="right")
    labels = sft.make_labels(inp["input_ids"], processor.tokenizer)
    with torch.no_grad():
        ours = sft.sft_loss(m, inp, labels)
        theirs = m(**inp, labels=labels).loss  # full logits, HF's shifted token-mean cross-entropy
    assert ours.item() > 1.0
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_lr_schedule():
    lrs = [sft.lr_at(s, 100, 1e-3, 0.1, "cosine") for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup over 10 steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-5  # cosine decay towards 0
    assert sft.lr_at(50, 100, 1e-3, 0.0, "linear") == pytest.approx(5e-4)
    assert {sft.lr_at(s, 10, 2e-6, 0.0, "constant") for s in range(10)} == {2e-6}


def test_bad_samples_are_named_or_skipped(coldstart, tmp_path):
    lines = open(coldstart).read().splitlines()[:4]
    no_cot = json.loads(lines[1])
    del no_cot["cot"]
    gone = dict(json.loads(lines[2]), id="gone", video=str(tmp_path / "missing.mp4"))
    no_answer = dict(json.loads(lines[3]), id="fallback")
    del no_answer["answer"]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(no_cot), json.dumps(gone), json.dumps(no_answer)]) + "\n")
    with pytest.raises(data.DataError, match=rf"bad.jsonl:2 \(sample {no_cot['id']}\).*no `cot`"):
        sft.read_coldstart(str(path), skip_bad=False)
    good, bad = sft.read_coldstart(str(path), skip_bad=True)
    assert [e.sample.id for e in good] == [json.loads(lines[0])["id"], "fallback"]
    assert len(bad) == 2 and "bad.jsonl:3 (sample gone)" in bad[1] and "video not found" in bad[1]
    span = no_answer["spans"][0]  # no teacher answer: the first GT span is the target's span
    assert good[1].target.endswith(f"<time>[{span[0]:.2f}, {span[1]:.2f}]</time>")
    # the CLI stops before loading any model, naming the file:line and the sample
    r = run_sft(["--model", "unused", "--data", path, "--out", tmp_path / "o"], check=False)
    assert r.returncode != 0 and f"bad.jsonl:2 (sample {no_cot['id']})" in r.stderr and "--skip-bad" in r.stderr


def broken_video_line(tmp_path, like: str) -> str:
    """A sample whose video exists but does not decode: only found mid-run, when first decoded."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 100)
    return json.dumps(dict(json.loads(like), id="broken", video=str(broken)))


def test_unreadable_video_stops_the_run_naming_the_sample(tiny_model_dir, coldstart, tmp_path):
    lines = open(coldstart).read().splitlines()[:4]
    path = tmp_path / "cold.jsonl"
    path.write_text("\n".join(lines + [broken_video_line(tmp_path, lines[0])]) + "\n")
    r = run_sft(["--model", tiny_model_dir, "--data", path, "--out", tmp_path / "o", "--batch-size", 5,
                 "--max-steps", 1], check=False)  # step 1 reads all 5 samples
    assert r.returncode != 0 and "cold.jsonl:5 (sample broken)" in r.stderr and "cannot decode" in r.stderr


# -----------------------------------------------------------------------------
# The real script


def test_loss_falls_when_overfitting_and_bad_samples_are_skipped(tiny_model_dir, synth_dir, tmp_path):
    good = make_coldstart(synth_dir / "train.jsonl", tmp_path / "four.jsonl", n=4).read_text().splitlines()
    no_cot = json.loads(good[1])
    del no_cot["cot"]
    cold = tmp_path / "cold.jsonl"
    cold.write_text("\n".join(good + [json.dumps(dict(no_cot, id="no_cot")), broken_video_line(tmp_path, good[0])]))
    out = tmp_path / "overfit"
    r = run_sft(["--model", tiny_model_dir, "--data", cold, "--out", out, "--lr", "3e-3", "--schedule", "constant",
                 "--batch-size", 4, "--micro-batch", 2, "--max-steps", 30, "--skip-bad"])
    assert "skipping 1 bad sample(s) of 6 (--skip-bad)" in r.stdout and "(sample no_cot): no `cot`" in r.stdout
    assert "(sample broken): sample broken: cannot decode video" in r.stdout  # found mid-run, replaced
    rows = metrics(out)
    assert [x["step"] for x in rows] == list(range(1, 31))
    assert rows[-1]["skipped"] == 2 and "| skipped 2" in r.stdout
    assert "step 30/30 | loss" in r.stdout and "ETA" in r.stdout and "tok/s" in r.stdout
    first, last = rows[0]["loss"], sum(x["loss"] for x in rows[-3:]) / 3
    assert last < first / 3, (first, last)
    cfg = json.load(open(out / "config.json"))
    assert cfg["deepspeed"]["train_batch_size"] == 4 and cfg["grad_accum"] == 2
    assert os.path.isfile(out / "loss.png")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, coldstart, tmp_path_factory):
    """One uninterrupted 1-process (ZeRO-0) run: 8 steps of 2 samples (micro 1 x 2 accumulation)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    flags = ["--model", tiny_model_dir, "--data", coldstart, "--lr", "1e-3", "--batch-size", 2, "--max-steps", 8,
             "--save-every", 2]
    run_sft(flags + ["--out", out])
    return flags, out


def test_two_process_zero3_equals_one_process(reference, tmp_path):
    flags, ref = reference
    out = tmp_path / "z3"
    r = run_sft(flags + ["--out", out, "--zero-stage", 3], nproc=2)
    assert "micro-batch 1 x grad accumulation 1 x 2 ranks" in r.stdout
    assert r.stdout.count("DeepSpeed config:") == 1  # printed once, by rank 0
    a, b, init = weights(ref / "model"), weights(out / "model"), weights(flags[1])
    assert a.keys() == b.keys() == init.keys()  # same (canonical) key names as the base model
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the runs really trained, so a tolerance of 1e-5 means something
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    for x, y in zip(metrics(ref), metrics(out)):  # the same samples in the same order
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def frozen(reference, tmp_path_factory):
    """--freeze-vision, 1 process: with the vision tower's outputs kept per video (the default) and
    encoded every time (--no-cache-videos). 8 steps of 4 (2 micro-batches of 2) over 12 samples of 4
    videos: a video comes back within the first epoch and in the next two."""
    flags, _ = reference
    flags = list(flags)
    flags[flags.index("--batch-size") + 1] = 4
    flags += ["--micro-batch", 2, "--freeze-vision"]
    runs = {}
    for name, extra in (("kept", []), ("encoded", ["--no-cache-videos"])):
        out = tmp_path_factory.mktemp("frozen") / name
        runs[name] = (out, run_sft(flags + ["--out", out, *extra]).stdout)
    return flags, runs


def test_kept_vision_outputs_train_as_encoding_every_time(frozen):
    _, runs = frozen
    (kept, log), (encoded, log_encoded) = runs["kept"], runs["encoded"]
    hits = re.search(r"vision cache: (\d+) of (\d+) micro-batches", log)
    assert hits and 0 < int(hits[1]) < int(hits[2]) == 16, log[-2000:]  # used, after the first encodes
    assert "vision cache:" not in log_encoded
    for x, y in zip(metrics(encoded), metrics(kept)):
        assert x["step"] == y["step"] and x["tokens"] == y["tokens"] and x["answer_tokens"] == y["answer_tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
    a, b = weights(encoded / "model"), weights(kept / "model")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_freeze_vision_under_zero3_trains_the_language_model_only(frozen, tmp_path):
    """2 ranks, ZeRO-3: the vision tower stays as loaded, and skipping it for kept outputs (all ranks
    agree, as its gathers are collective) trains as the 1-process run does."""
    flags, runs = frozen
    out = tmp_path / "frozen"
    r = run_sft(flags + ["--out", out, "--zero-stage", 3], nproc=2)  # each rank one micro-batch of 2 a step
    assert "vision tower frozen:" in r.stdout
    hits = re.search(r"vision cache: (\d+) of 8 micro-batches", r.stdout)  # rank 0's count: 8 steps of 1
    assert hits and int(hits[1]) > 0, r.stdout[-2000:]
    got, init = weights(out / "model"), weights(flags[1])
    vision = [k for k in init if k.startswith("visual.")]  # the checkpoint names of model.visual
    assert vision and all(torch.equal(got[k], init[k]) for k in vision)
    assert max((got[k] - init[k]).abs().max().item() for k in init if k not in vision) > 1e-3
    one = weights(runs["kept"][0] / "model")
    for k in one:
        torch.testing.assert_close(got[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_epoch_order_by_video_keeps_each_videos_samples_together():
    groups = [f"v{i % 5}" for i in range(14)]  # 5 videos, 2 or 3 samples each, interleaved in the file
    for epoch in range(3):
        order = sft.epoch_order(14, 7, epoch, groups)
        assert sorted(order) == list(range(14))
        runs = [g for i, g in enumerate(groups[j] for j in order) if i == 0 or g != groups[order[i - 1]]]
        assert sorted(runs) == sorted(set(groups))  # each video's samples form one run
        assert order == sft.epoch_order(14, 7, epoch, groups)  # a resumed run replays it
    orders = {tuple(sft.epoch_order(14, s, e, groups)) for s in range(2) for e in range(3)}
    assert len(orders) == 6  # a new order per epoch and per seed
    assert sft.epoch_order(14, 7, 1) == np.random.default_rng([7, 1]).permutation(14).tolist()  # the plain order


def test_group_by_video_batches_a_videos_queries_together(reference, coldstart, tmp_path):
    """The flag reaches the run: each step's `videos` (distinct videos in the batch) is what the
    grouped order gives, and the plain run's what the plain order gives; resuming with the flag
    changed is refused, naming it."""
    flags, ref = reference
    videos = [s.video for s in data.read_jsonl(coldstart)]
    n = len(videos)
    assert n == 12 and len(set(videos)) == 4  # 4 videos x 3 queries: batches of 2 straddle videos

    def expected(groups):
        per_epoch = [sft.epoch_order(n, 0, e, groups) for e in range(2)]
        return [len({videos[per_epoch[k // 6][2 * (k % 6) + i]] for i in range(2)}) for k in range(8)]

    out = tmp_path / "grouped"
    run_sft(flags + ["--out", out, "--group-by-video"])
    grouped = [x["videos"] for x in metrics(out)]
    assert grouped == expected(videos) and sum(grouped) < 8 * 2
    assert [x["videos"] for x in metrics(ref)] == expected(None) != grouped
    r = run_sft(flags + ["--out", ref, "--resume", "--no-group-by-video"], check=True)  # unchanged: finished
    assert "Nothing to do" in r.stdout
    r = run_sft(flags + ["--out", out, "--resume", "--no-group-by-video"], check=False)
    assert r.returncode != 0 and "group_by_video" in r.stderr and "changed since the checkpoint" in r.stderr


def test_kill_and_resume_equals_uninterrupted(reference, tmp_path):
    flags, ref = reference
    out = tmp_path / "killed"
    p = forked.Run("sft.py", [*flags, "--out", out, *VIDEO], tmp_path / "log.txt")
    try:
        while model.latest_checkpoint(str(out)) is None and p.alive():
            time.sleep(0.02)
    finally:
        p.kill()
    assert p.procs[0].exitcode == -signal.SIGKILL, p.text()[-3000:]
    assert not os.path.exists(out / "model")  # killed before the end
    ckpt = model.latest_checkpoint(str(out))
    step = json.load(open(os.path.join(ckpt, "trainer_state.json")))["step"]
    assert step < 8
    # a half-written checkpoint (no trainer_state.json) newer than the last complete one is ignored
    half = out / f"checkpoint-{step + 1:06d}"
    shutil.rmtree(half, ignore_errors=True)
    shutil.copytree(ckpt, half)
    os.remove(half / "trainer_state.json")

    r = run_sft(flags + ["--out", out], check=False)  # without --resume: refuses to touch the run
    assert r.returncode != 0 and "--resume" in r.stderr

    r = run_sft(flags + ["--out", out, "--resume"])
    assert f"resumed from {ckpt}: step {step}" in r.stdout
    a, b = weights(ref / "model"), weights(out / "model")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
    assert [x["step"] for x in metrics(out)] == list(range(1, 9))  # no step logged twice
    for x, y in zip(metrics(ref), metrics(out)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
    assert model.latest_checkpoint(str(out)).endswith("checkpoint-000008")

    # resuming a finished run does nothing (run.sh re-runs stages that are done)
    r = run_sft(flags + ["--out", out, "--resume"])
    assert "Nothing to do" in r.stdout and "DeepSpeed config" not in r.stdout


def test_saved_model_reloads_and_generates(reference, synth_dir):
    flags, ref = reference
    for d in (ref / "model", ref / "checkpoint-000008"):  # the final model and the last checkpoint
        m = model.load_model(str(d)).eval()
        processor = model.load_processor(str(d))
        s = data.read_jsonl(synth_dir / "test.jsonl")[0]
        inp = data.build_inputs(processor, [s], nframes=NFRAMES, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
        out = m.generate(**inp, max_new_tokens=10, do_sample=False,
                         suppress_tokens=model.suppress_ids(processor.tokenizer))
        new = out[0, inp["input_ids"].shape[1]:]
        assert 0 < len(new) <= 10
    sd, saved = m.state_dict(), weights(ref / "checkpoint-000008")
    assert torch.equal(sd["lm_head.weight"], saved["lm_head.weight"])  # the trained weights, not the base ones
    assert not torch.equal(saved["lm_head.weight"], weights(flags[1])["lm_head.weight"])
