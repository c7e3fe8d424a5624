"""predict.py as a user runs it: on a synthetic video with a model that answers (conftest's
`answering_model_dir`), the printed reasoning and span, --json, --plot; the clear errors; an answer
without a span from the random tiny model; and the vision tower run once for all queries of a video
with the same tokens as answering each query alone."""
import json

import pytest
import torch
from PIL import Image

import data
import forked
import model
import predict
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES

VIDEO = ["--nframes", str(NFRAMES), "--max-pixels", str(MAX_PIXELS), "--min-pixels", str(MIN_PIXELS)]


def run(*args):
    """`python predict.py ARGS`, started by tests/forked.py."""
    return forked.run("predict.py", args)


@pytest.fixture(scope="module")
def samples(synth_dir):
    return data.read_jsonl(synth_dir / "test.jsonl")[:3]  # the three queries the answering model learned


def query_flags(samples, with_gt=True):
    out = []
    for s in samples:
        out += ["--query", s.query] + (["--gt", f"{s.spans[0][0]},{s.spans[0][1]}"] if with_gt else [])
    return out


def test_cli_json_and_plot(answering_model_dir, samples, tmp_path):
    png = tmp_path / "timeline.png"
    p = run("--model", answering_model_dir, "--video", samples[0].video, *query_flags(samples), *VIDEO,
            "--max-new-tokens", 40, "--json", "--plot", png)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)  # stdout is one JSON object, nothing else
    assert out["video"] == samples[0].video and out["frames"] == NFRAMES
    assert out["duration"] == pytest.approx(samples[0].duration)
    assert [len(a) for a in out["answers"]] == [1, 1, 1]
    for (a,), s in zip(out["answers"], samples):
        # each query gets its own learned answer: the queries are not mixed up by the shared encode
        assert (a["query"], a["span"], a["gt"], a["iou"]) == (s.query, s.spans[0], s.spans[0], 1.0)
        assert a["reasoning"] == f"I look for: {s.query}" and a["text"].startswith("<think>")
    with Image.open(png) as im:  # one row per query, 10 x 1.9 inches each at 80 dpi
        assert im.format == "PNG" and im.size == (800, 3 * 152)


def test_text_output_names_reasoning_and_span(answering_model_dir, samples, capsys):
    code = predict.main(["--model", answering_model_dir, "--video", samples[0].video, *query_flags(samples[1:2]),
                         *VIDEO, "--max-new-tokens", "40"])
    out = capsys.readouterr().out
    s = samples[1]
    assert code == 0, out
    assert f"{NFRAMES} frames of 56x56 px, decoded and encoded once for 1 query" in out
    assert f"[1] {s.query}\n    reasoning: I look for: {s.query}\n" in out
    lo, hi = s.spans[0]
    assert f"    span: [{lo:.2f}, {hi:.2f}] s   (true [{lo:.2f}, {hi:.2f}] s, IoU 1.00)" in out


def test_an_answer_without_a_span_is_shown_raw(tiny_model_dir, samples, capsys):
    # The random tiny model writes byte soup: no <time> span in it.
    code = predict.main(["--model", tiny_model_dir, "--video", samples[0].video, "--query", samples[0].query,
                         *VIDEO, "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 1
    raw = out.split("raw answer: ")[1].split("\n")[0]
    assert len(raw) > 2 and "no span could be read from the answer" in out


@pytest.mark.parametrize("case", ["missing", "undecodable", "empty query", "bad gt"])
def test_bad_input_is_named_before_the_model_loads(case, samples, tmp_path):
    video, query, extra = samples[0].video, samples[0].query, []
    if case == "missing":
        video = tmp_path / "nope.mp4"
    elif case == "undecodable":
        video = tmp_path / "garbage.mp4"
        video.write_bytes(b"this is not a video" * 100)
    elif case == "empty query":
        query = "  "
    else:
        extra = ["--gt", "7,3"]
    # The model directory does not exist: reaching the model would fail with another message.
    p = run("--model", tmp_path / "no_model", "--video", video, "--query", query, *extra, *VIDEO)
    assert p.returncode == 2, p.stdout + p.stderr
    want = {"missing": f"video not found: {video}", "undecodable": f"cannot decode video {video}",
            "empty query": "--query is empty", "bad gt": "a span needs 0 <= START <= END"}[case]
    assert want in p.stderr and "Traceback" not in p.stderr, p.stderr


# -----------------------------------------------------------------------------
# In process: the shared encode, and sampling


@pytest.fixture(scope="module")
def loaded(answering_model_dir, samples):
    m = model.load_model(answering_model_dir).eval()
    return m, model.load_processor(answering_model_dir), data.load_video(samples[0], NFRAMES, MAX_PIXELS, MIN_PIXELS)


def test_shared_encode_equals_answering_each_query_alone(loaded, samples):
    m, processor, video = loaded
    calls = []
    hook = m.model.visual.register_forward_hook(lambda *_: calls.append(1))  # counts vision tower runs
    try:
        gen = predict.generation_kwargs(processor.tokenizer, 40, 0.0)
        shared = predict.answer(m, processor, samples[0].video, video, [s.query for s in samples], gen,
                                nframes=NFRAMES, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
        assert len(calls) == 1
        alone = []
        for s in samples:  # the plain way: pixels into generate, encoded again for every query
            inputs = data.build_inputs(processor, [s], [video], nframes=NFRAMES, max_pixels=MAX_PIXELS,
                                       min_pixels=MIN_PIXELS)
            with torch.inference_mode():
                alone.append(m.generate(**inputs, **gen)[0, inputs["input_ids"].shape[1]:].tolist())
        assert len(calls) == 1 + len(samples)
    finally:
        hook.remove()
    assert [a.ids for (a,) in shared] == alone
    assert len(set(map(tuple, alone))) == 3  # three different answers: a real comparison


def test_samples_show_the_spread(tiny_model_dir, samples):
    m, processor = model.load_model(tiny_model_dir).eval(), model.load_processor(tiny_model_dir)
    video = data.load_video(samples[0], NFRAMES, MAX_PIXELS, MIN_PIXELS)
    gen = predict.generation_kwargs(processor.tokenizer, 8, 1.0)

    def sample(seed):
        torch.manual_seed(seed)
        return predict.answer(m, processor, samples[0].video, video, [samples[0].query], gen, samples=4,
                              nframes=NFRAMES, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)[0]
    first = sample(0)
    assert len(first) == 4 and len({tuple(a.ids) for a in first}) > 1  # four draws, not one answer four times
    assert [a.ids for a in sample(0)] == [a.ids for a in first]  # --seed makes it repeatable
