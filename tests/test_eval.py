"""eval.py: scoring by hand-checked numbers and against a transcription of the paper's scorer, the
`score` CLI, then the real script run tiny (one process, resumed, sharded over two, and the old way: each
query decoding and encoding its video, for the same answers as grouping a video's queries)."""
import dataclasses
import json
import random
import re
from pathlib import Path

import pytest

import data
import eval as ev
import forked
import predict
import reward
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES, ASSETS

FIXTURE = Path(__file__).parent / "fixtures" / "tricky_predictions.jsonl"
VKW = dict(nframes=NFRAMES, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)


def run(script, *args, check=True, nproc=1):
    """`python SCRIPT ARGS` (nproc > 1: as torchrun's ranks), started by tests/forked.py."""
    p = forked.run(script, args, nproc=nproc)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {args} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def approx(d):
    return {k: (pytest.approx(v, abs=1e-9) if isinstance(v, float) else v) for k, v in d.items()}


# -----------------------------------------------------------------------------
# The tricky fixture, scored by hand. IoU = intersection / union of [s, e] spans, as read.
# Protocols: official (the released scorer now: the first one-line <time>..</time>, else the whole
# response, then its first two numbers), official-0724 (its first release: for charades_sta the first
# two numbers ANYWHERE), strict (reward.parse_span), taro (the LAST two numbers anywhere, swapped).
#
# charades_sta                                                                  off 0724 strct taro
#   c1 "<think>.. at 2 s .. at 5 s</think> <time>[20, 30]</time>" vs [20,30]      1    0    1    1
#      (0724 reads [2, 5] from <think>)
#   c2 no tags, "from 3 to 9 seconds" vs [3,12]: [3, 9] -> 6/9 = 2/3            2/3  2/3    0  2/3
#   c3 [0, 7] vs [0,10] -> 7/10 = 0.7 exactly (counts at 0.7: R1@m uses >=)      .7   .7   .7   .7
#   c4 [0, 3] vs [0,10] -> 3/10 = 0.3 exactly (counts at 0.3)                    .3   .3   .3   .3
#   c5 "<think>Seen from 5 to 15 s, seated by 12 s.</think> <time>[10, 18]</time>" vs [10,20]:
#      the tag [10, 18] -> 8/10; 0724 [5, 15] -> 5/15 = 1/3                      .8  1/3   .8   .8
#   c6 "<think>.. from 4 s to 8 s .. at 12 s.</think> <time>[20, 12]</time>" vs [12,20]: the tag is
#      reversed -> 0; 0724 [4, 8] -> 0; taro swaps the last two -> [12, 20]       0    0    0    1
#   official [1,2/3,.7,.3,.8,0]: @.3 5/6, @.5 4/6, @.7 3/6, mIoU (52/15)/6
#   0724     [0,2/3,.7,.3,1/3,0]: @.3 4/6, @.5 2/6, @.7 1/6, mIoU 2/6
#   strict   [1,0,.7,.3,.8,0]:   @.3 4/6, @.5 3/6, @.7 3/6, mIoU 2.8/6
#   taro     [1,2/3,.7,.3,.8,1]: @.3 6/6, @.5 5/6, @.7 4/6, mIoU (67/15)/6
# nextgqa (official = 0724: first one-line <time>..</time>, else the whole response). IoP = inter / pred length.
#   n1 think has 1.5 and 3, tag [4, 6] vs [4,8]: tag (and taro's last two) -> IoU 2/4 = .5, IoP 2/2 = 1 (all)
#   n2 [10, 14] vs [[0,4],[10,12],[13,20]]: IoUs 0, 2/4, 1/10 -> best .5; IoPs 0, 2/4, 1/4 -> best .5 (all)
#   n3 zero-length [3, 3] vs [2,4]: IoU 0, IoP 0 (no length), in every protocol
#   n4 "<think>from 1 to 2</think>\n<time>[2,\n4]</time>" vs [2,6]: the tag spans two lines, so official
#      reads the whole response -> [1, 2] -> touches [2,6] only -> IoU 0, IoP 0;
#      strict collapses the newline, taro takes the last two -> [2, 4] -> IoU 2/4 = .5, IoP 2/2 = 1
#   official IoU [.5,.5,0,0]: R1@.3 50, @.5 50, @.7 0, mIoU 1/4 = 25; IoP [1,.5,0,0]: @.3 50, @.5 50, mIoP 37.5
#   strict, taro IoU [.5,.5,0,.5]: 75, 75, 0, mIoU 1.5/4 = 37.5;       IoP [1,.5,0,1]: 75, 75, mIoP 62.5
# rextime (official = 0724: like nextgqa)                                       off 0724 strct taro
#   r1 reversed [8, 2] vs [2,8]: as read no extent; strict rejects; taro swaps    0    0    0    1
#   r2 [5, 20] past the 10 s video vs [5,10]: no clamping -> 5/15 = 1/3         1/3  1/3  1/3  1/3
#   r3 `pred: [0, 5]` (no response) vs [0,10] -> .5 exactly                      .5   .5   .5   .5
#   r4 [0, 5] vs the zero-length GT [0,0] -> intersection 0 -> 0                  0    0    0    0
#   r5 "[-2, 4]" vs [0,4]: unsigned numbers -> [2, 4] -> 2/4; strict rejects     .5   .5    0   .5
#   r6 "I cannot tell." -> [0, 0] / None -> 0                                     0    0    0    0
#   r7 "<think>Between 1.5 and 7.5 s.</think> <time>[2, 4]</time> Roughly 3 s long." vs [2,6]: the tag
#      [2, 4] -> 2/4; taro's last two [4, 3] -> [3, 4] -> 1/4                    .5   .5   .5  .25
#   official, 0724 [0,1/3,.5,0,.5,0,.5]: @.3 4/7, @.5 3/7, @.7 0, mIoU (11/6)/7
#   strict         [0,1/3,.5,0,0,0,.5]:  @.3 3/7, @.5 2/7, @.7 0, mIoU (4/3)/7
#   taro           [1,1/3,.5,0,.5,0,.25]: @.3 4/7, @.5 3/7, @.7 1/7, mIoU (31/12)/7
# overall, n = 17 (no IoP: not every sample is nextgqa)
#   official: >=.3: 5+2+4 = 11, >=.5: 4+2+3 = 9, >=.7: 3, sum of IoUs 52/15 + 1 + 11/6 = 6.3
#   0724:     >=.3: 4+2+4 = 10, >=.5: 2+2+3 = 7, >=.7: 1, sum 2 + 1 + 11/6 = 29/6
#   strict:   >=.3: 4+3+3 = 10, >=.5: 3+3+2 = 8, >=.7: 3, sum 2.8 + 1.5 + 4/3 = 169/30
#   taro:     >=.3: 6+3+4 = 13, >=.5: 5+3+3 = 11, >=.7: 4+0+1 = 5, sum 67/15 + 1.5 + 31/12 = 8.55

NEXTGQA_AS_READ = {"R1@0.3": 50.0, "R1@0.5": 50.0, "R1@0.7": 0.0, "mIoU": 25.0, "n": 4,
                   "IoP@0.3": 50.0, "IoP@0.5": 50.0, "mIoP": 37.5}
NEXTGQA_TWO_LINE_TAG_READ = {"R1@0.3": 75.0, "R1@0.5": 75.0, "R1@0.7": 0.0, "mIoU": 37.5, "n": 4,
                             "IoP@0.3": 75.0, "IoP@0.5": 75.0, "mIoP": 62.5}
REXTIME_OFFICIAL = {"R1@0.3": 400 / 7, "R1@0.5": 300 / 7, "R1@0.7": 0.0, "mIoU": 100 * (11 / 6) / 7, "n": 7}
EXPECTED = {
    "official": {
        "overall": {"R1@0.3": 1100 / 17, "R1@0.5": 900 / 17, "R1@0.7": 300 / 17, "mIoU": 630 / 17, "n": 17},
        "charades_sta": {"R1@0.3": 500 / 6, "R1@0.5": 400 / 6, "R1@0.7": 50.0, "mIoU": 100 * (52 / 15) / 6, "n": 6},
        "nextgqa": NEXTGQA_AS_READ,
        "rextime": REXTIME_OFFICIAL,
    },
    "official-0724": {
        "overall": {"R1@0.3": 1000 / 17, "R1@0.5": 700 / 17, "R1@0.7": 100 / 17, "mIoU": 100 * (29 / 6) / 17,
                    "n": 17},
        "charades_sta": {"R1@0.3": 400 / 6, "R1@0.5": 200 / 6, "R1@0.7": 100 / 6, "mIoU": 200 / 6, "n": 6},
        "nextgqa": NEXTGQA_AS_READ,
        "rextime": REXTIME_OFFICIAL,
    },
    "strict": {
        "overall": {"R1@0.3": 1000 / 17, "R1@0.5": 800 / 17, "R1@0.7": 300 / 17, "mIoU": 100 * (169 / 30) / 17,
                    "n": 17},
        "charades_sta": {"R1@0.3": 400 / 6, "R1@0.5": 50.0, "R1@0.7": 50.0, "mIoU": 280 / 6, "n": 6},
        "nextgqa": NEXTGQA_TWO_LINE_TAG_READ,
        "rextime": {"R1@0.3": 300 / 7, "R1@0.5": 200 / 7, "R1@0.7": 0.0, "mIoU": 100 * (4 / 3) / 7, "n": 7},
    },
    "taro": {
        "overall": {"R1@0.3": 1300 / 17, "R1@0.5": 1100 / 17, "R1@0.7": 500 / 17, "mIoU": 855 / 17, "n": 17},
        "charades_sta": {"R1@0.3": 100.0, "R1@0.5": 500 / 6, "R1@0.7": 400 / 6, "mIoU": 100 * (67 / 15) / 6, "n": 6},
        "nextgqa": NEXTGQA_TWO_LINE_TAG_READ,
        "rextime": {"R1@0.3": 400 / 7, "R1@0.5": 300 / 7, "R1@0.7": 100 / 7, "mIoU": 100 * (31 / 12) / 7, "n": 7},
    },
}


@pytest.mark.parametrize("parse", ["official", "official-0724", "strict", "taro"])
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
# transcribed with its float32 torch math (nncore.ops.temporal_iou / temporal_iof). Two releases:
# b261460 (2025-07-24) read Charades-STA's first two numbers anywhere; c818166 (2025-08-05) reads
# them inside the first <time>...</time> and falls back to the whole response, like the other sources.


def released_scorer(lines, charades_anywhere=False):
    import torch
    ious, iops = [], []
    for d in lines:
        if "response" in d:
            if d["source"] == "charades_sta" and charades_anywhere:  # b261460 only
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


def taro_released_scorer(lines):
    """TaRO's standalone_eval/evaluate_vtg.py (extract_time, calculate_iou, aggregate_and_calculate) at
    143a234, transcribed. Its files have no `pred` lines; here they get the same swap."""
    ious = []
    for d in lines:
        if "response" in d:
            numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", d["response"])]
            pred = numbers[-2:] if len(numbers) >= 2 else [None, None]
        else:
            pred = list(d["pred"])
        if pred[0] is not None and pred[0] > pred[1]:
            pred = [pred[1], pred[0]]
        best = 0
        for gs, ge in d["gt"]:
            iou = 0.0
            if pred[0] is not None:
                inter = max(0, min(ge, pred[1]) - max(gs, pred[0]))
                union = max(ge, pred[1]) - min(gs, pred[0])
                iou = 0.0 if union == 0 else inter / union
            best = max(best, iou)
        ious.append(best)
    n = len(ious)
    out = {f"R1@{m:g}": 100 * sum(v >= m for v in ious) / n for m in (0.3, 0.5, 0.7)}
    out["mIoU"] = 100 * sum(ious) / n
    return out


def random_lines(n, seed=0):
    """Responses in every shape the parsers meet, with times in quarter seconds (exact in float32 too)."""
    rng = random.Random(seed)
    shapes = ["<think>{a} to {b}</think> <time>[{c}, {d}]</time>", "<time>[{c}, {d}]</time>", "from {c} to {d} s",
              "<time>{c}</time>", "<think>x</think>\n<time>[{c},\n{d}]</time>", "no idea",
              "<time>[{c}, {d}]</time> then <time>[{a}, {b}]</time>", "<time>[{c} - {d}]</time> ({a})",
              "<think>{a}</think><time>[{c}, {d}]</time>", "<think>at {a}.5 s, not -{b}</think> <time>[{c}.25, {d}.75]</time>",
              "<time>{d}.5 to {c}.</time>"]
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


@pytest.mark.parametrize("parse, charades_anywhere", [("official", False), ("official-0724", True)])
def test_same_numbers_as_the_released_scorer(parse, charades_anywhere):
    lines = [json.loads(x) for x in FIXTURE.read_text().splitlines()] + random_lines(400)
    ref = released_scorer(lines, charades_anywhere)
    recs = [ev.prediction_from_dict(d, f"line {i}") for i, d in enumerate(lines)]
    ours = ev.score_predictions(recs, parse)["overall"]
    for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-4), k
    # IoP over the whole set (the scorer computes it for every sample; we report it for nextgqa only)
    nx = [d for d in lines if d["source"] == "nextgqa"]
    ref_nx = released_scorer(nx, charades_anywhere)
    ours_nx = ev.score_predictions([ev.prediction_from_dict(d, "x") for d in nx], parse)["per_source"]["nextgqa"]
    for k in ("IoP@0.3", "IoP@0.5", "mIoP", "R1@0.5"):
        assert ours_nx[k] == pytest.approx(ref_nx[k], abs=1e-4), k


def test_the_two_releases_differ_only_on_charades():
    lines = [json.loads(x) for x in FIXTURE.read_text().splitlines()] + random_lines(400)
    new, old = released_scorer(lines), released_scorer(lines, charades_anywhere=True)
    assert new["mIoU"] != old["mIoU"]  # the fixture's c1, c5 and the random lines tell them apart
    other = [d for d in lines if d["source"] != "charades_sta"]
    assert released_scorer(other) == released_scorer(other, charades_anywhere=True)


def test_same_numbers_as_taros_released_scorer():
    lines = [json.loads(x) for x in FIXTURE.read_text().splitlines()] + random_lines(400)
    ref = taro_released_scorer(lines)
    ours = ev.score_predictions([ev.prediction_from_dict(d, f"line {i}") for i, d in enumerate(lines)], "taro")
    for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU"):
        assert ours["overall"][k] == pytest.approx(ref[k], abs=1e-9), k


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think> <answer>\n8.50s to 12.40s\n</answer>", [8.5, 12.4]),  # TaRO's own answer format
    ("<think>at 2 and 5</think> <time>[20, 30]</time>", [20.0, 30.0]),  # the last two, tag or not
    ("from 3 to 9 seconds", [3.0, 9.0]),
    ("a 1 b 2 c 3", [2.0, 3.0]),
    ("<time>[12, 4]</time>", [4.0, 12.0]),  # reversed: swapped
    ("<time>[3, 3]</time>", [3.0, 3.0]),
    ("<time>[-2, 4]</time>", [2.0, 4.0]),  # unsigned: the '-' is not part of the number
    ("<time>[-4, -2]</time>", [2.0, 4.0]),  # ... and then swapped
    ("1.25 to 3.5", [1.25, 3.5]),
    ("5. to 7.", [5.0, 7.0]),  # a dot needs a digit after it
    (".5 to .75", [5.0, 75.0]),  # ... and one before it
    ("1.2.3", [1.2, 3.0]),
    ("01:05 - 01:10", [1.0, 10.0]),  # no clock times: four numbers, the last two win
    ("1e5 then 2", [2.0, 5.0]),  # no exponents: 1, 5, 2
    ("１２ to ３４", [12.0, 34.0]),  # Unicode digits, as Python's \d
    ("<time>7</time>", None),  # fewer than two numbers
    ("no numbers", None),
    ("", None),
    (None, None),
])
def test_taro_parser(text, expected):
    out = reward.parse_span_taro(text)
    assert out == expected and (out is None or all(type(v) is float for v in out))


# -----------------------------------------------------------------------------
# The score CLI and its input checks


def test_score_cli_json_and_table():
    out = json.loads(run("eval.py", "score", str(FIXTURE), "--json").stdout)
    want = EXPECTED["official"]
    assert {k: out[k] for k in want["overall"]} == approx(want["overall"])
    assert out["per_source"]["nextgqa"] == approx(want["nextgqa"])
    for parse in ("strict", "taro", "official-0724"):
        out = json.loads(run("eval.py", "score", str(FIXTURE), "--json", "--parse", parse).stdout)
        assert out["R1@0.7"] == pytest.approx(EXPECTED[parse]["overall"]["R1@0.7"]) and out["parse"] == parse
    table = run("eval.py", "score", str(FIXTURE)).stdout
    assert re.search(r"^overall\s+17\s+64\.71\s+52\.94\s+17\.65\s+37\.06$", table, re.M), table
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
        "--max-new-tokens", "16"]  # --batch-size 1: every answer exactly as if asked alone


@pytest.fixture(scope="module")
def test_set(synth_dir, tmp_path_factory):
    samples = data.read_jsonl(synth_dir / "test.jsonl")  # absolute video paths
    gone = data.Sample(id="gone_0", video=str(synth_dir / "videos" / "not_there.mp4"), duration=10.0,
                       query="when does the red circle appear?", spans=[[1.0, 2.0]], source="synth")
    path = tmp_path_factory.mktemp("evalset") / "test.jsonl"
    data.write_jsonl(path, samples[:4] + [gone] + samples[4:])
    return path


@pytest.fixture(scope="module")
def video_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its vision tower's output 30x larger, so that its answers depend on the video:
    the random model's hardly do (2 different answers to the 6 queries), and an answer given with another
    video's features would not show."""
    import torch
    import model
    m = model.load_model(tiny_model_dir)
    with torch.no_grad():
        for p in m.model.visual.merger.mlp[-1].parameters():  # the merger's last linear layer
            p.mul_(30.0)
    out = str(tmp_path_factory.mktemp("video_model"))
    m.save_pretrained(out)
    model.load_processor(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_process(video_model_dir, test_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1")
    p = run("eval.py", "--model", video_model_dir, "--data", str(test_set), "--out", str(out), "--allow-missing", *TINY)
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


def test_rerun_resumes(one_process, video_model_dir, test_set, tmp_path):
    src, _ = one_process
    out = tmp_path / "resume"
    out.mkdir()
    full = (src / "predictions.jsonl").read_text()
    lines = full.splitlines(keepends=True)
    # An interrupted run: 3 answers merged, the 4th in a rank file, a 5th cut off mid-write.
    (out / "eval_args.json").write_text((src / "eval_args.json").read_text())
    (out / "predictions.jsonl").write_text("".join(lines[:3]))
    (out / "predictions.rank0.jsonl").write_text(lines[3] + lines[4][:25])
    p = run("eval.py", "--model", video_model_dir, "--data", str(test_set), "--out", str(out), "--allow-missing", *TINY)
    assert "4 already answered" in p.stdout, p.stdout
    assert (out / "predictions.jsonl").read_text() == full  # the same answers, same order, no duplicates
    # Different settings into the same directory are refused instead of mixed in.
    args = TINY[:TINY.index("--max-new-tokens")] + ["--max-new-tokens", "8"]
    p = run("eval.py", "--model", video_model_dir, "--data", str(test_set), "--out", str(out), "--allow-missing",
            *args, check=False)
    assert p.returncode == 2 and "max_new_tokens=16" in p.stderr, p.stderr


def test_two_process_shards_give_the_same_predictions(one_process, video_model_dir, test_set, tmp_path):
    src, _ = one_process
    out = tmp_path / "two"
    p = run("eval.py", "--model", video_model_dir, "--data", str(test_set), "--out", str(out), "--allow-missing",
            *TINY, nproc=2)
    assert "generating on 2 rank(s)" in p.stdout
    one = [json.loads(x) for x in (src / "predictions.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [d["id"] for d in two] == [d["id"] for d in one]
    assert {d["id"]: d["response"] for d in two} == {d["id"]: d["response"] for d in one}
    assert json.loads((out / "metrics.json").read_text())["overall"] == json.loads(
        (src / "metrics.json").read_text())["overall"]


def test_grouped_predictions_are_the_per_query_predictions(one_process, video_model_dir, test_set, tmp_path):
    src, grouped = one_process
    out = tmp_path / "per_query"
    p = run("eval.py", "--model", video_model_dir, "--data", str(test_set), "--out", str(out), "--allow-missing",
            *TINY, "--no-group-videos")
    assert "7 samples about 3 videos" in grouped.stdout
    assert "each video decoded and encoded once for its queries" in grouped.stdout, grouped.stdout
    assert "each query on its own" in p.stdout, p.stdout
    # the same responses, byte for byte, in the same order; a different one to each query
    assert (out / "predictions.jsonl").read_text() == (src / "predictions.jsonl").read_text()
    assert len({json.loads(x)["response"] for x in (src / "predictions.jsonl").read_text().splitlines()}) == 6


def test_by_video_deals_whole_videos():
    mk = lambda i, video: data.Sample(id=str(i), video=video, duration=9.0, query="q", spans=[[0, 1]])
    samples = [mk(0, "a"), mk(1, "b"), mk(2, "a"), mk(3, "c"), mk(4, "b"), mk(5, "d"), mk(6, "a")]
    # a video's queries one after the other, in file order; videos in order of first appearance
    assert [s.id for s in ev.by_video(samples)] == ["0", "2", "6", "1", "4", "3", "5"]
    # two ranks: videos a, c to rank 0 and b, d to rank 1, whole
    assert [s.id for s in ev.by_video(samples, 0, 2)] == ["0", "2", "6", "3"]
    assert [s.id for s in ev.by_video(samples, 1, 2)] == ["1", "4", "5"]


def test_each_video_decoded_and_encoded_once(video_model_dir, test_set, monkeypatch):
    import model
    m, processor = model.load_model(video_model_dir).eval(), model.load_processor(video_model_dir)
    todo = ev.by_video([s for s in data.read_jsonl(test_set) if s.id != "gone_0"])  # 2 videos x 3 queries
    gen = predict.generation_kwargs(processor.tokenizer, 16, 0.0)
    decoded, encoded = [], []
    load_video = data.load_video  # the real decoder, counted
    monkeypatch.setattr(data, "load_video", lambda s, *args, **kw: decoded.append(s.id) or load_video(s, *args, **kw))
    hook = m.model.visual.register_forward_hook(lambda *_: encoded.append(1))  # counts vision tower runs

    calls = []

    def answer(batch_size, group_videos):
        decoded.clear()
        encoded.clear()
        calls.clear()
        texts = []
        for batch, out in ev.answer_batches(m, processor, todo, gen, batch_size, group_videos, 2, NFRAMES,
                                            MAX_PIXELS, MIN_PIXELS):
            calls.append([s.id for s in batch])
            texts += out
        return texts, len(decoded), len(encoded)
    try:
        alone, grouped = answer(1, False), answer(1, True)
        straddling = answer(2, True)  # calls [a1 a2] [a3 b1] [b2 b3]: video a's queries in two calls
        assert calls == [[s.id for s in todo[i:i + 2]] for i in (0, 2, 4)]
    finally:
        hook.remove()
    assert alone[1:] == (6, 6) and grouped[1:] == (2, 2) and straddling[1:] == (2, 2)
    assert grouped[0] == alone[0]  # exactly the same answers
    assert len(set(alone[0])) == 6  # a different answer to every query: a real comparison
    assert straddling[0] == alone[0]  # batched, a video's prompt prefilled once per call: the same here


def test_a_videos_queries_batched_share_one_prefill(video_model_dir, test_set):
    """--batch-size 3: each video's 3 queries in one generate call, the prompt up to the query prefilled
    once (batch 1) and the 3 answers decoded together: the answers of asking each query alone. And
    --batch-size 6: both videos in one call, their prefixes prefilled in one forward."""
    import torch
    import model
    m, processor = model.load_model(video_model_dir).eval(), model.load_processor(video_model_dir)
    todo = ev.by_video([s for s in data.read_jsonl(test_set) if s.id != "gone_0"])  # 2 videos x 3 queries
    gen = predict.generation_kwargs(processor.tokenizer, 16, 0.0)
    forwards = []  # (batch, tokens) of every language-model forward
    hook = m.model.language_model.register_forward_hook(
        lambda mod, args, kw, out: forwards.append(tuple(out.last_hidden_state.shape[:2])), with_kwargs=True)

    def answer(batch_size):
        forwards.clear()
        return [t for _, b in ev.answer_batches(m, processor, todo, gen, batch_size, True, 0, NFRAMES, MAX_PIXELS,
                                                MIN_PIXELS) for t in b]
    try:
        alone = answer(1)
        alone_forwards = list(forwards)
        batched = answer(3)
        batched_forwards = list(forwards)
        together = answer(6)
    finally:
        hook.remove()
    assert batched == alone and len(set(alone)) == 6
    n_video = int((data.build_inputs(processor, todo[:1], **VKW)["input_ids"] == m.config.video_token_id).sum())
    # the prompts (the only forwards longer than the video) run 6 times alone, twice batched (batch 1 each)
    assert sorted(b for b, t in alone_forwards if t > n_video) == [1] * 6
    assert [b for b, t in batched_forwards if t > n_video] == [1, 1]
    # then per video: one forward of the 3 queries' own tokens, and one per new token, 3 rows each
    assert {b for b, t in batched_forwards if t <= n_video} == {3}
    assert len(batched_forwards) < len(alone_forwards) / 2
    assert together == alone
    # both prefixes in one forward (batch 2), then the 6 rows together
    assert [b for b, t in forwards if t > n_video] == [2] and {b for b, t in forwards if t <= n_video} == {6}


def test_prompt_ids_are_build_inputs_ids(video_model_dir, test_set):
    import model
    processor = model.load_processor(video_model_dir)
    samples = [s for s in data.read_jsonl(test_set) if s.id != "gone_0"][:3]
    batch = data.build_inputs(processor, samples, **VKW)
    n_video = int((batch["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum())
    rows = data.prompt_ids(processor, samples, n_video, **VKW)
    assert [r.tolist() for r in rows] == [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"],
                                                                                    batch["attention_mask"])]
    with pytest.raises(ValueError, match="video placeholders"):
        data.prompt_ids(processor, [dataclasses.replace(samples[0], query="see <|video_pad|> here")], n_video, **VKW)


def test_real_benchmark_files_go_through_the_readers(tmp_path):
    # The real annotation files, no videos here: the run lists them and refuses before loading a model.
    p = run("eval.py", "--model", str(tmp_path / "no_model"), "--format", "charades_sta", "--data",
            str(ASSETS / "charades_sta" / "charades_sta_test.txt"), "--video-root", str(tmp_path / "videos"),
            "--limit", "5", "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2
    assert "5 of 5 videos are missing" in p.stderr and "charades_0" in p.stderr and "3MSZA.mp4" in p.stderr
    p = run("eval.py", "--model", "m", "--format", "nextgqa", "--data", str(ASSETS / "nextgqa" / "test.csv"),
            "--durations", "d.json", "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and "--durations is for charades_sta" in p.stderr


def test_constant_baseline_picks_the_best_span_on_train(tmp_path):
    import data
    # train: two samples [0, 4] and one [0, 8] on 10 s videos; the best constant span on a 1 s grid is
    # [0, 4] (mean IoU (1 + 1 + 0.5) / 3 = 0.8333) - it scores 1.0 and 0.5 on the two test samples
    mk = lambda i, span: data.Sample(id=str(i), video="v.mp4", duration=10.0, query="q", spans=[span], source="s")
    data.write_jsonl(tmp_path / "train.jsonl", [mk(0, [0, 4]), mk(1, [0, 4]), mk(2, [0, 8])])
    data.write_jsonl(tmp_path / "test.jsonl", [mk(3, [0, 4]), mk(4, [0, 8])])
    run("eval.py", "baseline", "--train", str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.jsonl"),
        "--out", str(tmp_path / "b"), "--grid", "1")
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["constant_span"] == [0.0, 4.0]
    assert m["train_mIoU"] == pytest.approx(100 * 2.5 / 3)
    assert m["overall"]["mIoU"] == pytest.approx(75.0) and m["overall"]["R1@0.5"] == pytest.approx(100.0)
    assert m["overall"]["R1@0.7"] == pytest.approx(50.0)


# -----------------------------------------------------------------------------
# cases.png (the paper's Figure 3): which samples, and the picture the real run writes


def test_pick_cases_best_worst_then_seeded_random():
    ious = [0.5, 0.9, 0.1, 0.9, 0.1, 0.3, 0.7]
    got = ev.pick_cases(ious, 4)
    assert got[:2] == [(1, "best"), (2, "worst")]  # ties go to the earlier sample
    assert [why for _, why in got[2:]] == ["random", "random"] and len({i for i, _ in got}) == 4
    assert ev.pick_cases(ious, 4) == got  # a fixed seed: the same picture for the same predictions
    assert len({tuple(ev.pick_cases(ious, 4, seed)) for seed in range(10)}) > 1  # the others are drawn
    assert sorted(i for i, _ in ev.pick_cases(ious, 99)) == list(range(7))  # more than there are: each once
    assert ev.pick_cases(ious, 1) == [(1, "best")] and ev.pick_cases(ious, 0) == [] and ev.pick_cases([], 6) == []
    assert ev.pick_cases([0.0, 0.0], 6) == [(0, "best"), (1, "worst")]  # all equal: still two samples


def test_eval_writes_cases_png(one_process):
    from PIL import Image
    out, p = one_process
    assert f"wrote {out / 'cases.png'}" in p.stdout
    with Image.open(out / "cases.png") as im:  # the 6 answered samples (--cases 6), a row of 1.9 in at 80 dpi each
        assert im.format == "PNG" and im.size == (800, 6 * 152)
        assert len(im.convert("RGB").getcolors(1 << 16) or []) > 50  # frames drawn, not a blank page


def test_prompts_of_different_lengths_share_one_call(video_model_dir, test_set):
    """Two videos with different token counts (16 and 8 frames) in one call: the shorter prefix is
    left-padded in the prefill, its rows' positions and rope offset are its own; each answer is the one
    its query gets alone."""
    import model
    m, processor = model.load_model(video_model_dir).eval(), model.load_processor(video_model_dir)
    todo = ev.by_video([s for s in data.read_jsonl(test_set) if s.id != "gone_0"])  # 2 videos x 3 queries
    videos = {todo[0].video: data.load_video(todo[0], **VKW),
              todo[3].video: data.load_video(todo[3], **dict(VKW, nframes=NFRAMES // 2))}
    assert videos[todo[0].video][0].shape[0] != videos[todo[3].video][0].shape[0]
    gen = predict.generation_kwargs(processor.tokenizer, 16, 0.0)
    rows = [todo[0], todo[3], todo[1], todo[4]]  # interleaved videos
    alone = [predict.generate_encoded(m, processor, [s], [videos[s.video]], {}, gen, **VKW)[0] for s in rows]
    together = predict.generate_shared_prompts(m, processor, rows, [videos[s.video] for s in rows], {}, gen, **VKW)
    text = lambda ids: processor.decode(ids, skip_special_tokens=True)  # noqa: E731  (pads dropped)
    assert [text(b) for b in together] == [text(a) for a in alone]
    assert len({text(a) for a in alone}) == 4
