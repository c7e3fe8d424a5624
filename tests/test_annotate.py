"""annotate.py: the IoU split, the cache (no request is ever paid twice, kill -9 safe), retries, and the
three teachers. The real SDKs (openai, google-genai) talk to a local HTTP server started by the test
(tests/fake_servers.py), the only stand-in we allow."""
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

import annotate
import data
import forked
import reward
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES, ROOT
from fake_servers import FakeTeacher

OPENAI_KEY = "sk-test-SECRET-openai-0123456789"
GEMINI_KEY = "gk-test-SECRET-gemini-9876543210"
VIDEO_FLAGS = ["--nframes", str(NFRAMES), "--max-pixels", str(MAX_PIXELS), "--min-pixels", str(MIN_PIXELS)]


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("GEMINI_API_KEY", GEMINI_KEY)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)


def make_data(tmp_path: Path, synth_dir: Path, n: int) -> tuple[Path, list[data.Sample]]:
    """n Samples on the synthetic videos with ground truth [0, 10] and unique queries (the fake
    server tells samples apart by their query)."""
    base = data.read_jsonl(synth_dir / "train.jsonl")
    samples = [replace(base[k], id=f"s{k}", query=f"query {k}: {base[k].query}", spans=[[0.0, 10.0]],
                       duration=None, captions=None) for k in range(n)]
    path = tmp_path / "train.jsonl"
    data.write_jsonl(path, samples)
    return path, data.read_jsonl(path)


def answer(s: float, e: float) -> str:
    return f"<think>The shape appears, moves, then leaves.</think> <time>[{s:.2f}, {e:.2f}]</time>"


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ids(path: Path) -> list[str]:
    return [s.id for s in data.read_jsonl(path)]


def summary_row(out: str, name: str) -> list[str]:
    row = next(line for line in out.splitlines() if line.startswith(name + " "))
    return [c.strip() for c in row.split("|")][1:]


# -----------------------------------------------------------------------------
# Pure parts


def test_split_boundaries_are_exact():
    assert annotate.split_of(0.8, hi=0.8, lo=0.4) == "rl"  # IoU > hi is strict
    assert annotate.split_of(0.8000001, hi=0.8, lo=0.4) == "coldstart"
    assert annotate.split_of(0.4, hi=0.8, lo=0.4) == "rl"  # IoU < lo is strict
    assert annotate.split_of(0.3999999, hi=0.8, lo=0.4) == "dropped"
    assert annotate.split_of(1.0, hi=1.0, lo=0.0) == "rl" and annotate.split_of(0.0, hi=1.0, lo=0.0) == "rl"
    # the IoUs the end-to-end test relies on are exact in floating point
    assert reward.temporal_iou([0, 8], [0, 10]) == 0.8 and reward.temporal_iou([0, 4], [0, 10]) == 0.4


def test_judge_malformed_answers():
    s = data.Sample(id="a", video="v.mp4", duration=20.0, query="q", spans=[[0.0, 10.0], [12.0, 14.0]])
    assert annotate.judge(answer(12, 14), s) == ("ok", [12.0, 14.0], 1.0)  # best over GT spans
    assert annotate.judge(answer(5, 30), s)[2] == 0.25  # [5, 20] after clamping to the 20 s video (0.17 unclamped)
    for bad in ["garbage", "<time>[0, 10]</time>",  # no <think>
                "<think> </think><time>[0, 10]</time>",  # empty reasoning
                "<think>ok</think><time>[10, 0]</time>",  # reversed
                "<think>ok</think><time>[0, 5, 10]</time>",
                "<think>maybe <time>[1, 2]</time></think><time>[0, 10]</time>"]:  # target would not be well formed
        status, _, iou = annotate.judge(bad, s)
        assert (status, iou) == ("malformed", 0.0), bad
    # The reasoning kept for SFT is the <think> text, and the SFT target it makes is well formed.
    assert annotate.think_text(" <think>\n a then b \n</think><time>[1, 2]</time>") == "a then b"
    assert reward.format_reward(data.format_answer("a then b", [1, 2])) == 1.0



def test_split_with_and_without_the_filters():
    """The paper's split, and the unfiltered files its ablations train on (Tables 3 and 4)."""
    samples = [data.Sample(id=i, video="v.mp4", duration=20.0, query="q", spans=[[0.0, 10.0]], source="synthetic")
               for i in ("good", "mid", "bad", "malformed", "failed", "missing")]
    final = {i: annotate.Annotation(i, "synthetic", "t", "m", status, resp, span, iou)
             for i, status, resp, span, iou in [
                 ("good", "ok", answer(0, 10), [0.0, 10.0], 1.0),
                 ("mid", "ok", answer(0, 6), [0.0, 6.0], 0.6),
                 ("bad", "ok", answer(15, 20), [15.0, 20.0], 0.0),
                 ("malformed", "malformed", "garbage", None, 0.0),
                 ("failed", "failed", None, None, 0.0)]}  # "missing": never answered
    cold, rl, rows, unfiltered = annotate.split_samples(samples, final, 0.8, 0.4, rl_include_coldstart=False)
    assert [s.id for s in cold] == ["good"] and cold[0].answer == [0.0, 10.0] and cold[0].cot
    assert [s.id for s in rl] == ["mid"] and rl[0].spans == [[0.0, 10.0]]  # RL keeps the original GT
    # R1-U's cold start: every well-formed answer is a target, its own span the answer, however wrong
    assert [(s.id, s.answer) for s in unfiltered["coldstart"]] == [("good", [0.0, 10.0]), ("mid", [0.0, 6.0]),
                                                                   ("bad", [15.0, 20.0])]
    # unfiltered RL: everything outside the cold start, the IoU < 0.4 and unanswered ones kept
    assert [s.id for s in unfiltered["rl"]] == ["mid", "bad", "malformed", "failed", "missing"]
    assert all(s.cot is None for s in unfiltered["rl"])
    assert rows["synthetic"]["dropped"] == 1 and rows["synthetic"]["failed"] == 3
def test_bad_flags_and_missing_key_are_clear_errors(tmp_path, synth_dir, monkeypatch, capsys):
    path, _ = make_data(tmp_path, synth_dir, 1)
    for flags in (["--hi", "0.3", "--lo", "0.5"], ["--noise", "2"]):
        with pytest.raises(SystemExit):
            annotate.main(["--data", str(path), "--teacher", "captions", "--out", str(tmp_path / "o")] + flags)
        assert flags[-2] in capsys.readouterr().err  # the message names the flag
    with pytest.raises(data.DataError, match="sample s0: the captions teacher needs dense captions"):
        annotate.main(["--data", str(path), "--teacher", "captions", "--out", str(tmp_path / "o")])
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="GEMINI_API_KEY"):
        annotate.main(["--data", str(path), "--teacher", "gemini", "--out", str(tmp_path / "o")])


# -----------------------------------------------------------------------------
# Both API teachers against the local server: splits, retries, failures, cache, key hygiene

# query index -> (teacher's answer, scripted failures first). Ground truth is [0, 10] everywhere.
PLAN = {
    0: (answer(0, 10), [429, 500]),  # IoU 1.0 after a 429 and a 500 -> coldstart
    1: (answer(0, 8), []),  # IoU 0.8 exactly -> RL, not coldstart
    2: (answer(0, 8.5), [("sleep", 3.0)]),  # IoU 0.85 after a timed-out attempt -> coldstart
    3: (answer(0, 4), []),  # IoU 0.4 exactly -> RL, not dropped
    4: (answer(0, 3.9), []),  # IoU 0.39 -> dropped
    5: ("I think it is somewhere in the middle.", []),  # garbage -> failed, cached with IoU 0
    6: (answer(0, 10), [500] * 100),  # never succeeds -> failed, NOT cached
    7: (answer(0, 10), [("echo_key", 400)]),  # a 400 is not retried; its message quotes our key
}


@pytest.mark.parametrize("teacher", ["openai", "gemini"])
def test_api_teacher_split_retries_cache(teacher, tmp_path, synth_dir, keys, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    path, samples = make_data(tmp_path, synth_dir, len(PLAN))
    out = tmp_path / "out"
    with FakeTeacher() as fake:
        for k, (text, script) in PLAN.items():
            fake.answers[samples[k].query] = text
            fake.script[samples[k].query] = list(script)
        base_url = fake.url + "/v1" if teacher == "openai" else fake.url
        flags = ["--data", str(path), "--teacher", teacher, "--base-url", base_url, "--out", str(out),
                 "--concurrency", "3", "--retries", "2", "--backoff", "0.01", "--timeout", "2"] + VIDEO_FLAGS
        if teacher == "openai":
            flags += ["--model", "qwen2.5-vl-72b"]
        annotate.main(flags)
        first = capsys.readouterr()
        counts = dict(fake.counts)

        q = [s.query for s in samples]
        assert counts[q[0]] == 3  # 429, 500, then the answer
        assert counts[q[2]] >= 2  # the timed-out attempt was retried
        assert counts[q[6]] == 3  # 1 + --retries 2, then it gave up
        assert all(counts[q[k]] == 1 for k in (1, 3, 4, 5, 7))
        assert fake.max_in_flight <= 3  # --concurrency bounds the requests in flight

        assert ids(out / "coldstart.jsonl") == ["s0", "s2"]
        assert ids(out / "rl.jsonl") == ["s1", "s3"]
        recs = {r["id"]: r for r in lines(out / "annotations.jsonl")}
        assert recs["s1"]["iou"] == 0.8 and recs["s3"]["iou"] == 0.4
        assert recs["s0"]["attempts"] == 3 and recs["s0"]["tokens"]["prompt"] > 0
        assert recs["s5"]["status"] == "malformed" and recs["s5"]["iou"] == 0.0
        assert recs["s5"]["response"] == PLAN[5][0]
        assert recs["s6"]["status"] == "failed" and "500" in recs["s6"]["error"]
        assert recs["s7"]["status"] == "failed" and "API key not valid: ***" in recs["s7"]["error"]
        assert recs["s0"]["teacher"] == teacher and recs["s0"]["model"]
        # source | n | coldstart | rl | dropped | failed | mean IoU (over the 6 answered samples)
        assert summary_row(first.out, "all") == ["8", "2", "2", "1", "3", f"{(1 + .8 + .85 + .4 + .39 + 0) / 6:.2f}"]

        cold = data.read_jsonl(out / "coldstart.jsonl")
        assert cold[0].cot == "The shape appears, moves, then leaves." and cold[1].answer == [0.0, 8.5]
        assert cold[1].spans == [[0.0, 10.0]]  # the ground truth stays
        assert [s.to_json() for s in data.read_jsonl(out / "rl.jsonl")] == [samples[1].to_json(), samples[3].to_json()]

        # The key reached the server (so it was really in use) but is nowhere in what we print, log or write.
        key = OPENAI_KEY if teacher == "openai" else GEMINI_KEY
        assert any(key in json.dumps(h) for h in fake.headers)
        for text in [first.out, first.err, caplog.text] + [p.read_text() for p in out.iterdir()]:
            assert key not in text

        # Re-run with other thresholds: finished samples cost zero requests; the failed ones are retried.
        fake.script[q[6]] = []
        annotate.main(flags + ["--hi", "0.79", "--lo", "0.41", "--rl-include-coldstart"])
        again = dict(fake.counts)
        assert {k: again[k] - counts[k] for k in counts} == {**{x: 0 for x in q}, q[6]: 1, q[7]: 1}
        assert ids(out / "coldstart.jsonl") == ["s0", "s1", "s2", "s6", "s7"]  # 0.8 > 0.79 now
        assert ids(out / "rl.jsonl") == ["s0", "s1", "s2", "s6", "s7"]  # s3 (0.4 < 0.41) dropped; cold-start kept
        capsys.readouterr()
        annotate.main(flags)
        assert "8 samples, 8 cached, 0 to annotate" in capsys.readouterr().out
        assert dict(fake.counts) == again


def test_wrong_key_aborts_without_printing_it(tmp_path, synth_dir, keys):
    path, samples = make_data(tmp_path, synth_dir, 3)
    with FakeTeacher() as fake:
        fake.script[samples[0].query] = [("echo_key", 401)]
        with pytest.raises(SystemExit) as exc:
            annotate.main(["--data", str(path), "--teacher", "gemini", "--base-url", fake.url,
                           "--out", str(tmp_path / "out"), "--concurrency", "1"])
        assert fake.counts[samples[2].query] == 0  # the queued requests were cancelled
    assert "sample s0" in str(exc.value) and "401" in str(exc.value) and "API key not valid: ***" in str(exc.value)
    assert GEMINI_KEY not in str(exc.value) and GEMINI_KEY not in (tmp_path / "out" / "annotations.jsonl").read_text()


def test_openai_request_has_prompt_frames_and_timestamps(tmp_path, synth_dir, keys):
    path, samples = make_data(tmp_path, synth_dir, 1)
    with FakeTeacher() as fake:
        fake.answers[samples[0].query] = answer(0, 10)
        annotate.main(["--data", str(path), "--teacher", "openai", "--model", "m", "--base-url", fake.url + "/v1",
                       "--out", str(tmp_path / "out"), "--max-tokens", "1234"] + VIDEO_FLAGS)
        body = fake.bodies[samples[0].query][0]
    assert body["model"] == "m" and body["max_tokens"] == 1234
    system, user = body["messages"]
    assert system == {"role": "system", "content": data.SYSTEM_PROMPT}
    parts = user["content"]
    assert parts[-1] == {"type": "text", "text": samples[0].query}  # the video first, then the query
    frames = parts[:-1]
    assert len(frames) == 2 * NFRAMES
    _, meta = data.load_video(samples[0], NFRAMES, MAX_PIXELS, MIN_PIXELS)
    assert [p["text"] for p in frames[0::2]] == [f"<{i / meta['fps']:.1f}s>" for i in meta["frames_indices"]]
    assert all(p["image_url"]["url"].startswith("data:image/jpeg;base64,") for p in frames[1::2])
    assert "10" not in json.dumps([p for p in parts if p["type"] == "text"][-1])  # never the ground truth


def test_gemini_request_inline_and_files_api(tmp_path, synth_dir, keys):
    path, samples = make_data(tmp_path, synth_dir, 2)
    video_bytes = Path(samples[0].video).read_bytes()
    with FakeTeacher() as fake:
        for s in samples:
            fake.answers[s.query] = answer(0, 10)
        common = ["--data", str(path), "--teacher", "gemini", "--base-url", fake.url, "--max-tokens", "777"]
        annotate.main(common + ["--out", str(tmp_path / "inline"), "--limit", "1"])
        body = fake.bodies[samples[0].query][0]
        assert body["systemInstruction"]["parts"] == [{"text": data.SYSTEM_PROMPT}]
        assert body["generationConfig"]["maxOutputTokens"] == 777
        video, query = body["contents"][0]["parts"]
        assert query == {"text": samples[0].query}
        assert base64.urlsafe_b64decode(video["inlineData"]["data"]) == video_bytes  # the SDK sends URL-safe base64
        rec = lines(tmp_path / "inline" / "annotations.jsonl")[0]
        assert rec["model"] == "gemini-2.5-pro" and rec["tokens"] == {"prompt": 2000, "completion": 60}

        # A video over --inline-max-mb goes through the Files API: uploaded, referenced, then deleted.
        annotate.main(common + ["--out", str(tmp_path / "files"), "--inline-max-mb", "0", "--limit", "1"])
        body = fake.bodies[samples[0].query][1]
        video = body["contents"][0]["parts"][0]
        assert list(video) == ["fileData"] and "/files/f0" in json.dumps(video)
        assert fake.files == {}  # deleted after use
        assert ids(tmp_path / "files" / "coldstart.jsonl") == ["s0"]


def test_kill_9_loses_only_requests_in_flight(tmp_path, synth_dir, keys):
    """A real kill -9 of a running annotate.py, plus a torn last line; the re-run repeats no
    finished request."""
    path, samples = make_data(tmp_path, synth_dir, 6)
    out = tmp_path / "out"
    release = threading.Event()
    with FakeTeacher() as fake:
        for s in samples:
            fake.answers[s.query] = answer(0, 10)
        fake.script[samples[3].query] = [("hold", release)]  # s3 hangs until we let go
        flags = ["--data", str(path), "--teacher", "gemini", "--base-url", fake.url, "--out", str(out),
                 "--concurrency", "1"]
        proc = subprocess.Popen([sys.executable, str(ROOT / "annotate.py")] + flags, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
        deadline = time.time() + 120
        while not (fake.counts[samples[3].query] and (out / "annotations.jsonl").exists()
                   and len((out / "annotations.jsonl").read_text().splitlines()) == 3):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("annotate.py ended or stalled: " + proc.communicate()[1].decode()[-2000:])
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        release.set()
        assert ids_done(out) == ["s0", "s1", "s2"]
        with open(out / "annotations.jsonl", "a") as f:  # as if killed in the middle of a write
            f.write('{"id": "s3", "source": "synth", "teacher": "gem')
        before = dict(fake.counts)

        annotate.main(flags)
        after = dict(fake.counts)
    assert {s.id: after[s.query] - before.get(s.query, 0) for s in samples} == \
        {"s0": 0, "s1": 0, "s2": 0, "s3": 1, "s4": 1, "s5": 1}
    assert sorted(ids_done(out)) == [f"s{k}" for k in range(6)]  # every line parses: the fragment is gone
    assert ids(out / "coldstart.jsonl") == [f"s{k}" for k in range(6)]


def ids_done(out: Path) -> list[str]:
    return [r["id"] for r in lines(out / "annotations.jsonl")]


# -----------------------------------------------------------------------------
# The captions teacher (offline): the CPU preset's cold-start data


def test_captions_teacher_coldstart_is_valid_sft_data(tmp_path, synth_dir, tiny_model_dir, capsys):
    import model
    out = tmp_path / "out"
    annotate.main(["--data", str(synth_dir / "train.jsonl"), "--teacher", "captions", "--out", str(out)])
    printed = capsys.readouterr().out
    assert summary_row(printed, "synth") == ["12", "12", "0", "0", "0", "1.00"]
    for name in ("annotations.jsonl", "coldstart.jsonl", "rl.jsonl"):
        assert (out / name).exists() and str(out / name) in printed
    train = {s.id: s for s in data.read_jsonl(synth_dir / "train.jsonl")}
    cold = data.read_jsonl(out / "coldstart.jsonl")
    assert [s.id for s in cold] == list(train)
    for s in cold:
        assert s.answer == train[s.id].spans[0] and s.spans == train[s.id].spans
        # the events with their times in time order up to the queried one, marked, then the answer
        caps = sorted(train[s.id].captions, key=lambda c: c["start"])
        pick = next(k for k, c in enumerate(caps) if [c["start"], c["end"]] == s.answer)
        cap = lambda c: c["text"][:1].upper() + c["text"][1:]  # noqa: E731
        before = "".join(f"{cap(c)} from {c['start']:.2f} s to {c['end']:.2f} s. " for c in caps[:pick])
        color = next(c for c in data.SYNTH_COLORS if c in caps[pick]["text"].split())
        assert color in s.query.split()  # noise 0: the right event
        marked = cap(caps[pick]).replace(f" in {color} ", f" in {color} (the query) ")
        assert s.cot == (f"{before}{marked} from {s.answer[0]:.2f} s to {s.answer[1]:.2f} s. "
                         f"So the answer is {s.answer[0]:.2f} to {s.answer[1]:.2f} seconds.")
        assert reward.format_reward(data.format_answer(s.cot, s.answer)) == 1.0
    # What sft.py checks: non-empty cot, an answer span, a readable video that build_inputs turns into inputs.
    processor = model.load_processor(tiny_model_dir)
    targets = [data.format_answer(s.cot, s.answer) for s in cold[:2]]
    batch = data.build_inputs(processor, cold[:2], answers=targets, nframes=NFRAMES, max_pixels=MAX_PIXELS,
                              min_pixels=MIN_PIXELS, padding_side="right")
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values_videos"].numel() > 0
    decoded = processor.tokenizer.decode(batch["input_ids"][0])
    assert cold[0].cot[:40] in decoded


def test_mark_caption_goes_after_the_deciding_word():
    q = {"when", "does", "the", "red", "bar", "appear"}
    # the last word only this caption has and the query has: the colour (the shape repeats)
    assert annotate.mark_caption("a bar in red moves", ["a bar in blue moves"], q) == "a bar in red (the query) moves"
    # the shape is unique too, but the colour comes later: still after the colour
    assert annotate.mark_caption("A bar in red.", ["a circle in blue"], q) == "A bar in red (the query)."
    # no word of its own in the query (a noisy pick): after its own last word; none at all: at the end
    assert annotate.mark_caption("a dog runs", ["a cat runs"], q) == "a dog (the query) runs"
    assert annotate.mark_caption("a cat runs", ["a cat runs"], q) == "a cat runs (the query)"
    assert annotate.mark_caption("a cat runs", [], {"x"}) == "a cat runs (the query)"


def test_captions_noise_is_filtered_and_reproducible(tmp_path, synth_dir):
    flags = ["--data", str(synth_dir / "train.jsonl"), "--teacher", "captions", "--noise", "0.6", "--seed", "3"]
    annotate.main(flags + ["--out", str(tmp_path / "a")])
    annotate.main(flags + ["--out", str(tmp_path / "b")])
    a = {r["id"]: r for r in lines(tmp_path / "a" / "annotations.jsonl")}
    b = {r["id"]: r for r in lines(tmp_path / "b" / "annotations.jsonl")}
    assert {k: r["response"] for k, r in a.items()} == {k: r["response"] for k, r in b.items()}
    assert a[next(iter(a))]["model"] == "captions-v3-noise0.6-seed3"
    ious = [r["iou"] for r in a.values()]
    assert all(r["status"] == "ok" for r in a.values())  # noisy, but always well formed
    assert min(ious) < 0.4 and max(ious) == 1.0  # the filter has something to filter
    cold, rl = ids(tmp_path / "a" / "coldstart.jsonl"), ids(tmp_path / "a" / "rl.jsonl")
    assert set(cold) == {k for k, r in a.items() if r["iou"] > 0.8}
    assert set(rl) == {k for k, r in a.items() if 0.4 <= r["iou"] <= 0.8}
    # Re-running in place appends nothing; another seed is another cache key.
    annotate.main(flags + ["--out", str(tmp_path / "a")])
    assert len(lines(tmp_path / "a" / "annotations.jsonl")) == 12
    annotate.main(flags[:-1] + ["4", "--out", str(tmp_path / "a")])
    assert len(lines(tmp_path / "a" / "annotations.jsonl")) == 24


def test_sft_py_trains_on_captions_coldstart(tmp_path, synth_dir, tiny_model_dir):
    """The cold-start file goes straight into the real SFT script (one step, as a user would run it)."""
    annotate.main(["--data", str(synth_dir / "train.jsonl"), "--teacher", "captions", "--noise", "0.3",
                   "--out", str(tmp_path / "ann")])
    proc = forked.run("sft.py", ["--model", tiny_model_dir, "--data", tmp_path / "ann" / "coldstart.jsonl",
                                 "--out", tmp_path / "sft", "--max-steps", "1", "--batch-size", "2", *VIDEO_FLAGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sft" / "model" / "config.json").exists()
