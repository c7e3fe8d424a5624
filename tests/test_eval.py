"""eval.py: scoring by hand-checked numbers and against a transcription of the paper's scorer, the
`score` CLI, then the real script run tiny (one process, resumed, and sharded over two)."""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import data
import eval as ev
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES, ROOT, SHARED

FIXTURE = Path(__file__).parent / "fixtures" / "tricky_predictions.jsonl"
PY = sys.executable


def run(*args, check=True):
    p = subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def approx(d):
    return {k: (pytest.approx(v, abs=1e-9) if isinstance(v, float) else v) for k, v in d.items()}


# -----------------------------------------------------------------------------
# The tricky fixture, scored by hand. IoU = intersection / union of [s, e] spans, as read.
#
# charades_sta (official: the first two numbers ANYWHERE in the response, the scorer's Charades branch)
#   c1 "<think>... at 2 s ... at 5 s</think> <time>[20, 30]</time>" vs [20,30]: official reads [2, 5] -> 0;
#      strict reads the tag [20, 30] -> 1
#   c2 no tags, "from 3 to 9 seconds" vs [3,12]: official [3, 9] -> 6/9 = 2/3; strict: no tag -> 0
#   c3 [0, 7] vs [0,10] -> 7/10 = 0.7 exactly (counts at 0.7: R1@m uses >=)
#   c4 [0, 3] vs [0,10] -> 3/10 = 0.3 exactly (counts at 0.3)
#   official [0, 2/3, .7, .3]: R1@.3 3/4=75, @.5 2/4=50, @.7 1/4=25, mIoU (2/3+1)/4 = 41.666..
#   strict   [1, 0, .7, .3]:   R1@.3 3/4=75, @.5 2/4=50, @.7 2/4=50, mIoU 2/4 = 50
# nextgqa (official: first one-line <time>..</time>, else the whole response). IoP = inter / pred length.
#   n1 think has 1.5 and 3, tag [4, 6] vs [4,8]: tag wins -> IoU 2/4 = .5, IoP 2/2 = 1 (both parsers)
#   n2 [10, 14] vs [[0,4],[10,12],[13,20]]: IoUs 0, 2/4, 1/10 -> best .5; IoPs 0, 2/4, 1/4 -> best .5
#   n3 zero-length [3, 3] vs [2,4]: IoU 0, IoP 0 (no length); strict parses it too -> 0, 0
#   n4 "<think>from 1 to 2</think>\n<time>[2,\n4]</time>" vs [2,6]: the tag spans two lines, so official
#      reads the whole response -> [1, 2] -> touches [2,6] only -> IoU 0, IoP 0;
#      strict collapses the newline -> [2, 4] -> IoU 2/4 = .5, IoP 2/2 = 1
#   official IoU [.5,.5,0,0]: R1@.3 50, @.5 50, @.7 0, mIoU 1/4 = 25; IoP [1,.5,0,0]: @.3 50, @.5 50, mIoP 37.5
#   strict IoU [.5,.5,0,.5]: 75, 75, 0, mIoU 1.5/4 = 37.5;             IoP [1,.5,0,1]: 75, 75, mIoP 62.5
# rextime (official: like nextgqa)
#   r1 reversed [8, 2] vs [2,8]: official reads it as is -> no extent -> 0; strict rejects -> 0
#   r2 [5, 20] past the 10 s video vs [5,10]: no clamping -> 5/15 = 1/3 (both)
#   r3 `pred: [0, 5]` (no response) vs [0,10] -> .5 exactly (both)
#   r4 [0, 5] vs the zero-length GT [0,0] -> intersection 0 -> 0 (both)
#   r5 "[-2, 4]" vs [0,4]: official numbers are unsigned -> [2, 4] -> 2/4 = .5; strict rejects -> 0
#   r6 "I cannot tell." -> official [0, 0] -> 0; strict None -> 0
#   official [0,1/3,.5,0,.5,0]: R1@.3 3/6=50, @.5 2/6=33.33, @.7 0, mIoU (4/3)/6 = 22.22
#   strict   [0,1/3,.5,0,0,0]:  R1@.3 2/6=33.33, @.5 1/6=16.67, @.7 0, mIoU (5/6)/6 = 13.89
# overall, n = 14 (no IoP: not every sample is nextgqa)
#   official: >=.3: 3+2+3 = 8, >=.5: 2+2+2 = 6, >=.7: 1, sum of IoUs 5/3 + 1 + 4/3 = 4
#   strict:   >=.3: 3+3+2 = 8, >=.5: 2+3+1 = 6, >=.7: 2, sum 2 + 1.5 + 5/6 = 13/3

EXPECTED = {
    "official": {
        "overall": {"R1@0.3": 800 / 14, "R1@0.5": 600 / 14, "R1@0.7": 100 / 14, "mIoU": 400 / 14, "n": 14},
        "charades_sta": {"R1@0.3": 75.0, "R1@0.5": 50.0, "R1@0.7": 25.0, "mIoU": 100 * (5 / 3) / 4, "n": 4},
        "nextgqa": {"R1@0.3": 50.0, "R1@0.5": 50.0, "R1@0.7": 0.0, "mIoU": 25.0, "n": 4,
                    "IoP@0.3": 50.0, "IoP@0.5": 50.0, "mIoP": 37.5},
        "rextime": {"R1@0.3": 50.0, "R1@0.5": 100 * 2 / 6, "R1@0.7": 0.0, "mIoU": 100 * (4 / 3) / 6, "n": 6},
    },
    "strict": {
        "overall": {"R1@0.3": 800 / 14, "R1@0.5": 600 / 14, "R1@0.7": 200 / 14, "mIoU": 100 * (13 / 3) / 14, "n": 14},
        "charades_sta": {"R1@0.3": 75.0, "R1@0.5": 50.0, "R1@0.7": 50.0, "mIoU": 50.0, "n": 4},
        "nextgqa": {"R1@0.3": 75.0, "R1@0.5": 75.0, "R1@0.7": 0.0, "mIoU": 37.5, "n": 4,
                    "IoP@0.3": 75.0, "IoP@0.5": 75.0, "mIoP": 62.5},
        "rextime": {"R1@0.3": 100 * 2 / 6, "R1@0.5": 100 / 6, "R1@0.7": 0.0, "mIoU": 100 * (5 / 6) / 6, "n": 6},
    },
}


@pytest.mark.parametrize("parse", ["official", "strict"])
def test_tricky_fixture_hand_checked(parse):
    m = ev.score_predictions(ev.read_predictions(FIXTURE), parse)
    want = EXPECTED[parse]
    assert m["parse"] == parse
    assert m["overall"] == approx(want["overall"])
    assert set(m["per_source"]) == {"charades_sta", "nextgqa", "rextime"}
    for src in m["per_source"]:
        assert m["per_source"][src] == approx(want[src]), src


def test_exact_threshold_counts():
    # IoU exactly 0.3 / 0.5 / 0.7 counts at that threshold (>=), with nothing above it.
    recs = [ev.Prediction(id=str(k), source="x", gt=[[0.0, 10.0]], pred=[0.0, float(k)]) for k in (3, 5, 7)]
    m = ev.score_predictions(recs)["overall"]
    assert (m["R1@0.3"], m["R1@0.5"], m["R1@0.7"]) == (100.0, pytest.approx(200 / 3), pytest.approx(100 / 3))


# -----------------------------------------------------------------------------
# Against the released scorer: VideoMind's eval_auto.py as shipped in TVG-R1 (grounding part),
# transcribed with its float32 torch math (nncore.ops.temporal_iou / temporal_iof).


def released_scorer(lines):
    import torch
    ious, iops = [], []
    for d in lines:
        if "response" in d:
            if d["source"] == "charades_sta":
                nums = re.findall(r"\d+\.?\d*", d["response"])
            else:
                try:
                    nums = re.findall(r"\d+\.?\d*", re.search(r"<time>(.*?)</time>", d["response"]).group(1))
                except AttributeError:
                    nums = re.findall(r"\d+\.?\d*", d["response"])
            pred = [list(map(float, nums[:2]))]
        else:
            pred = [d["pred"]]
        if pred == [[]]:
            pred = [[0, 0]]
        try:
            p, g = torch.Tensor(pred), torch.Tensor(d["gt"])
            inter = (torch.min(p[:, None, 1], g[None, :, 1]) - torch.max(p[:, None, 0], g[None, :, 0])).clamp(0)
            iou = inter / ((p[:, 1] - p[:, 0])[:, None] + (g[:, 1] - g[:, 0]) - inter)
            iof = inter / (p[:, 1] - p[:, 0])[:, None]
            iou, iof = torch.where(iou.isfinite(), iou, 0), torch.where(iof.isfinite(), iof, 0)
        except IndexError:  # one number: the scorer's compute_iou fails -> 0 (we do not copy its stale-IoP bug)
            iou = iof = torch.zeros(1, 1)
        ious.append(iou[0].max())
        iops.append(iof[0].max())
    n = len(lines)
    out = {f"R1@{m:g}": 100 * sum(bool(v >= m) for v in ious) / n for m in (0.3, 0.5, 0.7)}  # float32 compares
    out["mIoU"] = 100 * sum(v.item() for v in ious) / n
    out.update({f"IoP@{m:g}": 100 * sum(bool(v >= m) for v in iops) / n for m in (0.3, 0.5)})
    out["mIoP"] = 100 * sum(v.item() for v in iops) / n
    return out


def random_lines(n, seed=0):
    """Responses in every shape the parsers meet, with whole-second times (exact in float32 too)."""
    rng = random.Random(seed)
    shapes = ["<think>{a} to {b}</think> <time>[{c}, {d}]</time>", "<time>[{c}, {d}]</time>", "from {c} to {d} s",
              "<time>{c}</time>", "<think>x</think>\n<time>[{c},\n{d}]</time>", "no idea",
              "<time>[{c}, {d}]</time> then <time>[{a}, {b}]</time>", "<time>[{c} - {d}]</time> ({a})",
              "<think>{a}</think><time>[{c}, {d}]</time>"]
    lines = []
    for i in range(n):
        t = [rng.randint(0, 30) for _ in range(4)]
        gt = [sorted(rng.randint(0, 30) for _ in range(2)) for _ in range(rng.choice([1, 1, 2, 3]))]
        d = {"id": str(i), "source": rng.choice(["charades_sta", "nextgqa", "rextime"]), "gt": gt}
        if rng.random() < 0.1:
            d["pred"] = t[:2]
        else:
            d["response"] = rng.choice(shapes).format(a=t[0], b=t[1], c=t[2], d=t[3])
        lines.append(d)
    return lines


def test_same_numbers_as_the_released_scorer():
    lines = [json.loads(x) for x in FIXTURE.read_text().splitlines()] + random_lines(400)
    ref = released_scorer(lines)
    recs = [ev.prediction_from_dict(d, f"line {i}") for i, d in enumerate(lines)]
    ours = ev.score_predictions(recs)["overall"]
    for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-4), k
    # IoP over the whole set (the scorer computes it for every sample; we report it for nextgqa only)
    nx = [d for d in lines if d["source"] == "nextgqa"]
    ref_nx = released_scorer(nx)
    ours_nx = ev.score_predictions([ev.prediction_from_dict(d, "x") for d in nx])["per_source"]["nextgqa"]
    for k in ("IoP@0.3", "IoP@0.5", "mIoP", "R1@0.5"):
        assert ours_nx[k] == pytest.approx(ref_nx[k], abs=1e-4), k


# -----------------------------------------------------------------------------
# The score CLI and its input checks


def test_score_cli_json_and_table():
    out = json.loads(run("eval.py", "score", str(FIXTURE), "--json").stdout)
    want = EXPECTED["official"]
    assert {k: out[k] for k in want["overall"]} == approx(want["overall"])
    assert out["per_source"]["nextgqa"] == approx(want["nextgqa"])
    strict = json.loads(run("eval.py", "score", str(FIXTURE), "--json", "--parse", "strict").stdout)
    assert strict["R1@0.7"] == pytest.approx(200 / 14) and strict["parse"] == "strict"
    table = run("eval.py", "score", str(FIXTURE)).stdout
    assert re.search(r"^overall\s+14\s+57\.14\s+42\.86\s+7\.14\s+28\.57$", table, re.M), table
    assert re.search(r"^nextgqa\s+4\s+50\.00\s+50\.00\s+37\.50$", table, re.M), table  # the IoP table


def test_score_reads_other_formats(tmp_path):
    # VideoMind's output.json: a JSON list, `span` for the GT, `pred` as a list of candidates, no id.
    f = tmp_path / "output.json"
    f.write_text(json.dumps([{"source": "rextime", "span": [[0, 10]], "pred": [[0, 5], [1, 2]]},
                             {"source": "rextime", "span": [[0, 10]], "response": "<time>[0, 10]</time>"}]))
    m = ev.score_predictions(ev.read_predictions(f))["overall"]
    assert (m["n"], m["mIoU"], m["R1@0.7"]) == (2, 75.0, 50.0)


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "response": "x"}', "missing field gt"),
    ('{"id": "a", "gt": [[0, 1]]}', "needs a response"),
    ('{"id": "a", "gt": [[0, 1]], "pred": [0]}', "pred must be [start, end]"),
    ('{"id": "a", "gt": [[0, "x"]], "response": "r"}', "must be a number"),
    ('{"id": "a", "gt": [], "response": "r"}', "non-empty list"),
    ('{"id": "a", "gt": [[0, 1]], "response": 5}', "response must be a string"),
    ('{"id": "a", "gt": [[0, 1]], "response": "r"', "not valid JSON"),
])
def test_score_errors_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "preds.jsonl"
    f.write_text('{"id": "ok", "gt": [[0, 1]], "response": "<time>[0, 1]</time>"}\n\n' + line + "\n")
    p = run("eval.py", "score", str(f), check=False)
    assert p.returncode == 2
    assert f"{f}:3" in p.stderr and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# -----------------------------------------------------------------------------
# The real script, tiny: 6 synthetic samples plus one whose video is missing.

TINY = ["--nframes", str(NFRAMES), "--max-pixels", str(MAX_PIXELS), "--min-pixels", str(MIN_PIXELS),
        "--max-new-tokens", "16", "--batch-size", "3"]


@pytest.fixture(scope="module")
def test_set(synth_dir, tmp_path_factory):
    samples = data.read_jsonl(synth_dir / "test.jsonl")  # absolute video paths
    gone = data.Sample(id="gone_0", video=str(synth_dir / "videos" / "not_there.mp4"), duration=10.0,
                       query="when does the red circle appear?", spans=[[1.0, 2.0]], source="synth")
    path = tmp_path_factory.mktemp("evalset") / "test.jsonl"
    data.write_jsonl(path, samples[:4] + [gone] + samples[4:])
    return path


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, test_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1")
    p = run("eval.py", "--model", tiny_model_dir, "--data", str(test_set), "--out", str(out), "--allow-missing", *TINY)
    return out, p


def test_missing_videos_refused_before_the_model_loads(test_set, tmp_path):
    # The model path does not exist: reaching the model would fail differently.
    p = run("eval.py", "--model", str(tmp_path / "no_model"), "--data", str(test_set), "--out", str(tmp_path / "o"),
            *TINY, check=False)
    assert p.returncode == 2, p.stderr
    assert "1 of 7 videos are missing" in p.stderr and "gone_0" in p.stderr and "--allow-missing" in p.stderr
    assert not (tmp_path / "o" / "predictions.jsonl").exists()


def test_eval_writes_predictions_and_metrics(one_process, test_set):
    out, p = one_process
    samples = data.read_jsonl(test_set)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [d["id"] for d in lines] == [s.id for s in samples if s.id != "gone_0"]  # file order, merged
    for d, s in zip(lines, [s for s in samples if s.id != "gone_0"]):
        assert set(d) == {"id", "source", "query", "response", "gt", "duration"}
        assert (d["source"], d["query"], d["gt"], d["duration"]) == (s.source, s.query, s.spans, s.duration)
        assert isinstance(d["response"], str)
    assert not list(out.glob("predictions.rank*.jsonl"))
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n_total"], m["n_evaluated"], m["n_skipped_missing"]) == (7, 6, 1)
    assert (m["nframes"], m["max_pixels"], m["max_new_tokens"], m["parse"]) == (NFRAMES, MAX_PIXELS, 16, "official")
    assert m["overall"]["n"] == 6 and set(m["per_source"]) == {"synth"}
    # metrics.json is exactly what `score` gives on predictions.jsonl
    assert m["overall"] == ev.score_predictions(ev.read_predictions(out / "predictions.jsonl"))["overall"]
    assert (out / "missing_videos.txt").read_text().startswith("gone_0\t")
    # the printed table, and the skipped count beside it
    assert re.search(r"^overall\s+6(\s+\d+\.\d\d){4}$", p.stdout, re.M), p.stdout
    assert "evaluated 6 of 7 samples; 1 skipped for missing videos" in p.stdout


def test_rerun_resumes(one_process, tiny_model_dir, test_set, tmp_path):
    src, _ = one_process
    out = tmp_path / "resume"
    out.mkdir()
    full = (src / "predictions.jsonl").read_text()
    lines = full.splitlines(keepends=True)
    # An interrupted run: 3 answers merged, the 4th in a rank file, a 5th cut off mid-write.
    (out / "eval_args.json").write_text((src / "eval_args.json").read_text())
    (out / "predictions.jsonl").write_text("".join(lines[:3]))
    (out / "predictions.rank0.jsonl").write_text(lines[3] + lines[4][:25])
    p = run("eval.py", "--model", tiny_model_dir, "--data", str(test_set), "--out", str(out), "--allow-missing", *TINY)
    assert "4 already answered" in p.stdout, p.stdout
    assert (out / "predictions.jsonl").read_text() == full  # the same answers, same order, no duplicates
    # Different settings into the same directory are refused instead of mixed in.
    args = TINY[:TINY.index("--max-new-tokens")] + ["--max-new-tokens", "8", "--batch-size", "3"]
    p = run("eval.py", "--model", tiny_model_dir, "--data", str(test_set), "--out", str(out), "--allow-missing",
            *args, check=False)
    assert p.returncode == 2 and "max_new_tokens=16" in p.stderr, p.stderr


def test_two_process_shards_give_the_same_predictions(one_process, tiny_model_dir, test_set, tmp_path):
    src, _ = one_process
    out = tmp_path / "two"
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "eval.py", "--model",
                        tiny_model_dir, "--data", str(test_set), "--out", str(out), "--allow-missing", *TINY],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "generating on 2 rank(s)" in p.stdout
    one = [json.loads(x) for x in (src / "predictions.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [d["id"] for d in two] == [d["id"] for d in one]
    assert {d["id"]: d["response"] for d in two} == {d["id"]: d["response"] for d in one}
    assert json.loads((out / "metrics.json").read_text())["overall"] == json.loads(
        (src / "metrics.json").read_text())["overall"]


def test_real_benchmark_files_go_through_the_readers(tmp_path):
    # The real annotation files, no videos here: the run lists them and refuses before loading a model.
    p = run("eval.py", "--model", str(tmp_path / "no_model"), "--format", "charades_sta", "--data",
            str(SHARED / "charades_sta" / "charades_sta_test.txt"), "--video-root", str(tmp_path / "videos"),
            "--limit", "5", "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2
    assert "5 of 5 videos are missing" in p.stderr and "charades_0" in p.stderr and "3MSZA.mp4" in p.stderr
    p = run("eval.py", "--model", "m", "--format", "nextgqa", "--data", str(SHARED / "nextgqa" / "test.csv"),
            "--durations", "d.json", "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and "--durations is for charades_sta" in p.stderr


def test_constant_baseline_picks_the_best_span_on_train(tmp_path):
    import data
    # train: two samples [0, 4] and one [0, 8] on 10 s videos; the best constant span on a 1 s grid is
    # [0, 4] (mean IoU (1 + 1 + 0.5) / 3 = 0.8333) - it scores 1.0 and 0.5 on the two test samples
    mk = lambda i, span: data.Sample(id=str(i), video="v.mp4", duration=10.0, query="q", spans=[span], source="s")
    data.write_jsonl(tmp_path / "train.jsonl", [mk(0, [0, 4]), mk(1, [0, 4]), mk(2, [0, 8])])
    data.write_jsonl(tmp_path / "test.jsonl", [mk(3, [0, 4]), mk(4, [0, 8])])
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), "baseline", "--train", str(tmp_path / "train.jsonl"),
                        "--test", str(tmp_path / "test.jsonl"), "--out", str(tmp_path / "b"), "--grid", "1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["constant_span"] == [0.0, 4.0]
    assert m["train_mIoU"] == pytest.approx(100 * 2.5 / 3)
    assert m["overall"]["mIoU"] == pytest.approx(75.0) and m["overall"]["R1@0.5"] == pytest.approx(100.0)
    assert m["overall"]["R1@0.7"] == pytest.approx(50.0)
