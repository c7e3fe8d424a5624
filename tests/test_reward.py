"""Unit tests for reward.py: table-driven edge cases, then hypothesis properties."""

import math
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reward import (
    ANSWER_TAG,
    THINK_TAG,
    format_reward,
    grounding_metrics,
    iop,
    official_iou,
    parse_span,
    parse_span_official,
    temporal_iou,
    tvg_reward,
)

FAST = settings(deadline=None, max_examples=200)


def test_tags():
    assert (ANSWER_TAG, THINK_TAG) == ("time", "think")


# ---------------------------------------------------------------------------------------------
# parse_span
# ---------------------------------------------------------------------------------------------

PARSE_CASES = [
    # accepted forms
    ("<time>[5.2, 10.4]</time>", (5.2, 10.4)),
    ("<time>5.2, 10.4</time>", (5.2, 10.4)),
    ("<time>5.2 - 10.4</time>", (5.2, 10.4)),
    ("<time>5.2-10.4</time>", (5.2, 10.4)),
    ("<time>5.2 to 10.4</time>", (5.2, 10.4)),
    ("<time>[5.2s, 10.4s]</time>", (5.2, 10.4)),
    ("<time>[5.2 s, 10.4 s]</time>", (5.2, 10.4)),
    ("<time>5.2 sec to 10.4 seconds</time>", (5.2, 10.4)),
    ("<time>[5, 10]</time>", (5.0, 10.0)),
    ("<time>[5., 10.]</time>", (5.0, 10.0)),
    ("<time>[01:05.5, 1:10]</time>", (65.5, 70.0)),
    ("<time>[1:02:03, 1:02:04.5]</time>", (3723.0, 3724.5)),
    ("<time>00:05 - 00:10</time>", (5.0, 10.0)),
    ("<time>[3, 3]</time>", (3.0, 3.0)),  # zero-length is a valid answer
    ("<time>[0, 0]</time>", (0.0, 0.0)),
    ("<time>[100000, 200000]</time>", (100000.0, 200000.0)),  # out of range: tvg_reward clamps
    # whitespace and newlines inside the tag
    ("<time>\n  [ 5.2 ,\n 10.4 ]\n</time>", (5.2, 10.4)),
    ("<time>\t5.2\n-\n10.4\t</time>", (5.2, 10.4)),
    # surrounding text, including unicode
    ("<think>视频开始时人在走路</think>\n<time>[1, 2]</time>答案", (1.0, 2.0)),
    ("the answer is <time>[1, 2]</time>.", (1.0, 2.0)),
    # repeated / nested tags: the last complete block wins
    ("<time>[1,2]</time> ... <time>[3,4]</time>", (3.0, 4.0)),
    ("<time><time>[1,2]</time>", (1.0, 2.0)),
    ("<time>[1,2]</time><time>[3,4]", (1.0, 2.0)),  # trailing unclosed block ignored
    ("<time>[1,2]</time> <time>[3, 4] or so</time>", None),  # last block bad: no fallback
    ("<time>[1,2]</time></time>", None),  # last </time> pairs with the only <time>: "[1,2]</time>"
    # rejected: count of numbers
    ("<time>[5.2]</time>", None),
    ("<time>[1, 2, 3]</time>", None),
    ("<time>1 - 2 - 3</time>", None),
    # rejected: negatives, NaN, inf, overflow, reversed
    ("<time>[-5, 10]</time>", None),
    ("<time>[5, -10]</time>", None),
    ("<time>[nan, 10]</time>", None),
    ("<time>[NaN, NaN]</time>", None),
    ("<time>[0, inf]</time>", None),
    ("<time>[0, Infinity]</time>", None),
    ("<time>[0, 1e3]</time>", None),
    (f"<time>[0, {'9' * 400}]</time>", None),  # float() overflows to inf
    ("<time>[10.4, 5.2]</time>", None),
    # rejected: malformed
    ("<time>[5.2, 10.4</time>", None),
    ("<time>5.2, 10.4]</time>", None),
    ("<time>[[5.2, 10.4]]</time>", None),
    ("<time>5.2to10.4</time>", None),
    ("<time>5.2 and 10.4</time>", None),
    ("<time>from 5.2 to 10.4</time>", None),
    ("<time>.5, 1</time>", None),
    ("<time>[1:75, 2:00]</time>", None),  # seconds field >= 60
    ("<time>[1:5, 1:10]</time>", None),  # clock fields are two digits
    ("<time>[５, １０]</time>", None),  # full-width digits are not numbers here
    ("<time>[٥, ١٠]</time>", None),  # nor Arabic-Indic digits
    ("<time></time>", None),
    ("<time>garbage</time>", None),
    # missing or broken tags
    ("[5.2, 10.4]", None),
    ("<time>[5.2, 10.4]", None),
    ("[5.2, 10.4]</time>", None),
    ("</time>[5.2, 10.4]<time>", None),
    ("<TIME>[5.2, 10.4]</TIME>", None),
    ("<answer>[5.2, 10.4]</answer>", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", PARSE_CASES)
def test_parse_span(text, expected):
    assert parse_span(text) == expected


@pytest.mark.parametrize("bad", [None, b"<time>[1, 2]</time>", 12, 1.5, ["<time>[1,2]</time>"], {}])
def test_parse_span_non_str_returns_none(bad):
    assert parse_span(bad) is None


def test_parse_span_custom_tag():
    assert parse_span("<answer>[1, 2]</answer>", tag="answer") == (1.0, 2.0)
    assert parse_span("<time>[1, 2]</time>", tag="answer") is None


# Adversarial 1 MB inputs. A quadratic parser takes minutes on these; ours must stay linear.
MB = 1_000_000
ADVERSARIAL = [
    "x" * MB,
    "<time>" * (MB // 6),
    "</time>" * (MB // 7),
    "<time>" + " " * MB + "</time>",
    "<time>1" + " " * MB + "x</time>",
    "<time>" + "1" * MB + "</time>",
    "<time>" + "1, " * (MB // 3) + "</time>",
    "<time>" + "1:00" * (MB // 4) + "</time>",
    "<time>[1" + "s " * (MB // 2) + "</time>",
    "<think>" * (MB // 7) + "<time>[1, 2]</time>",
    "1." * (MB // 2),
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_long_inputs_are_fast(text):
    t0 = time.perf_counter()
    parse_span(text)
    format_reward(text)
    tvg_reward(text, [0, 10], 30.0)
    parse_span_official(text)
    assert time.perf_counter() - t0 < 2.0


# ---------------------------------------------------------------------------------------------
# temporal_iou / iop
# ---------------------------------------------------------------------------------------------

IOU_CASES = [
    ([0, 10], [0, 10], 1.0),  # identical
    ([0, 5], [0, 10], 0.5),  # contained
    ([0, 10], [5, 15], 5 / 15),  # partial overlap
    ([0, 5], [5, 10], 0.0),  # touching
    ([0, 5], [6, 10], 0.0),  # disjoint
    ([2, 4], [0, 10], 0.2),
    ([0.5, 2.5], [1.5, 3.5], 1 / 3),
    ([3, 3], [0, 10], 0.0),  # zero-length pred
    ([3, 3], [3, 3], 0.0),  # empty union -> 0 by definition
    ([5, 3], [0, 10], 0.0),  # reversed pred has length 0
    ([0, 10], [5, 3], 0.0),  # reversed gt too
    ([5, 3], [5, 3], 0.0),
    ([10, 0], [0, 10], 0.0),
    ([-5, 5], [0, 10], 5 / 15),  # negative coordinates are just numbers here
    ((0, 10), (0.0, 5.0), 0.5),  # any 2-sequence
    ([0, float("inf")], [0, 10], 0.0),
    ([0, float("nan")], [0, 10], 0.0),
]


@pytest.mark.parametrize("a,b,expected", IOU_CASES)
def test_temporal_iou(a, b, expected):
    assert temporal_iou(a, b) == pytest.approx(expected, abs=1e-12)
    assert temporal_iou(b, a) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "pred,gt,expected",
    [
        ([0, 5], [0, 10], 1.0),  # pred inside gt
        ([0, 10], [0, 5], 0.5),
        ([0, 10], [20, 30], 0.0),
        ([3, 3], [0, 10], 0.0),  # zero-length pred
        ([5, 3], [0, 10], 0.0),  # reversed pred
        ([0, 10], [5, 3], 0.0),  # reversed gt: nothing to intersect
        ([0, float("nan")], [0, 10], 0.0),
    ],
)
def test_iop(pred, gt, expected):
    assert iop(pred, gt) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "gt,m", [([0, 3], 0.3), ([2, 5], 0.3), ([0, 5], 0.5), ([5, 10], 0.5), ([0, 7], 0.7)]
)
def test_iou_from_whole_seconds_is_exact(gt, m):
    # thresholds compare exactly, so these must be bit-exact to count in R1@m
    iou = temporal_iou(gt, [0, 10])
    assert iou == m
    assert grounding_metrics([iou], thresholds=(m,))[f"R1@{m}"] == 100.0


def test_decimal_spans_can_land_one_ulp_below_threshold():
    # documented behaviour: no epsilon, so this 0.3 - 1ulp does not count at 0.3
    iou = temporal_iou([1.1, 4.1], [1.1, 11.1])
    assert iou < 0.3 and iou == pytest.approx(0.3)
    assert grounding_metrics([iou])["R1@0.3"] == 0.0


# ---------------------------------------------------------------------------------------------
# format_reward
# ---------------------------------------------------------------------------------------------

FORMAT_CASES = [
    ("<think>reasoning</think><time>[1, 2]</time>", 1.0),
    ("<think>a\nb</think>\n<time>[1, 2]</time>", 1.0),
    ("  \n<think>a</think>  \n\n  <time>\n[1, 2]\n</time>\n ", 1.0),
    ("<think></think><time>[1, 2]</time>", 1.0),  # empty reasoning still has the format
    ("<think>人在门口</think><time>00:01 - 00:02</time>", 1.0),
    ("<think>numbers 3, 4 in reasoning</think><time>[1, 2]</time>", 1.0),
    # negatives
    ("Answer: <think>a</think><time>[1, 2]</time>", 0.0),  # text before
    ("<think>a</think><time>[1, 2]</time> done", 0.0),  # text after
    ("<think>a</think> so <time>[1, 2]</time>", 0.0),  # text between
    ("<time>[1, 2]</time>", 0.0),  # missing think
    ("<think>a</think>", 0.0),  # missing time
    ("<think>a</think><time>[1, 2]</time><time>[3, 4]</time>", 0.0),  # two time tags
    ("<think>a <time>[1, 2]</time></think><time>[1, 2]</time>", 0.0),  # time nested in think
    ("<think>a</think><think>b</think><time>[1, 2]</time>", 0.0),  # two think tags
    ("<think><think>a</think><time>[1, 2]</time>", 0.0),  # extra open think
    ("<time>[1, 2]</time><think>a</think>", 0.0),  # think after time
    ("<think>a<time>[1, 2]</think></time>", 0.0),  # interleaved
    ("<think>a</think><time>[2, 1]</time>", 0.0),  # unparseable: reversed
    ("<think>a</think><time>about 1 to 2 s</time>", 0.0),  # unparseable content
    ("<think>a</think><time></time>", 0.0),
    ("<think>a</think><time>[1, 2]", 0.0),  # unclosed
    ("", 0.0),
    (None, 0.0),
    (b"<think>a</think><time>[1, 2]</time>", 0.0),
]


@pytest.mark.parametrize("text,expected", FORMAT_CASES)
def test_format_reward(text, expected):
    assert format_reward(text) == expected


# ---------------------------------------------------------------------------------------------
# tvg_reward
# ---------------------------------------------------------------------------------------------

GOOD = "<think>r</think><time>{}</time>"


@pytest.mark.parametrize(
    "text,gt,duration,iou,fmt",
    [
        (GOOD.format("[0, 10]"), [0, 10], 30.0, 1.0, 1.0),
        (GOOD.format("[0, 5]"), [0, 10], 30.0, 0.5, 1.0),
        ("<time>[0, 5]</time>", [0, 10], 30.0, 0.5, 0.0),  # IoU without format
        (GOOD.format("[15, 40]"), [15, 30], 30.0, 1.0, 1.0),  # pred clamped to the video end
        (GOOD.format("[15, 40]"), [15, 30], None, 15 / 25, 1.0),  # no duration -> no clamping
        (GOOD.format("[15, 40]"), [15, 30], 0.0, 15 / 25, 1.0),
        (GOOD.format("[15, 40]"), [15, 30], float("nan"), 15 / 25, 1.0),
        (GOOD.format("[20, 30]"), [20, 45], 30.0, 1.0, 1.0),  # gt clamped as well
        (GOOD.format("[40, 50]"), [20, 30], 30.0, 0.0, 1.0),  # clamps to [30, 30]: zero length
        (GOOD.format("[-5, 10]"), [0, 10], 20.0, 0.0, 0.0),  # negatives never parse
        (GOOD.format("[0, 5]"), [[20, 25], [0, 5], [0, 10]], 30.0, 1.0, 1.0),  # best of several
        (GOOD.format("[0, 5]"), [[20, 25], [0, 10]], 30.0, 0.5, 1.0),
        (GOOD.format("[0, 5]"), [[0, 10]], 30.0, 0.5, 1.0),
        ("garbage", [0, 10], 30.0, 0.0, 0.0),
        (None, [0, 10], 30.0, 0.0, 0.0),
    ],
)
def test_tvg_reward(text, gt, duration, iou, fmt):
    reward, parts = tvg_reward(text, gt, duration)
    assert parts["iou"] == pytest.approx(iou, abs=1e-12)
    assert parts["format"] == fmt
    assert reward == 0.9 * parts["iou"] + 0.1 * parts["format"]  # exactly the paper's formula


def test_tvg_reward_parts_and_weights():
    reward, parts = tvg_reward(GOOD.format("[15, 40]"), [15, 30], 30.0)
    assert set(parts) == {"iou", "format", "span"}
    assert parts["span"] == (15.0, 40.0)  # the parsed span, before clamping
    assert tvg_reward("nothing", [0, 1], 10.0)[1]["span"] is None
    reward, parts = tvg_reward(GOOD.format("[0, 5]"), [0, 10], 30.0, w_iou=1.0, w_format=0.0)
    assert reward == 0.5


# ---------------------------------------------------------------------------------------------
# Official parser and scorer
# ---------------------------------------------------------------------------------------------

OFFICIAL_CASES = [
    ("<time>[5.2, 10.4]</time>", [5.2, 10.4]),
    ("<time>[1, 2]</time> <time>[3, 4]</time>", [1.0, 2.0]),  # first tag wins
    ("<time>\n[1, 2]\n</time> and 3 to 4", [1.0, 2.0]),  # newline in tag -> whole response
    ("<time>[1,\n2]</time>\n<time>[3, 4]</time>", [3.0, 4.0]),  # first ONE-LINE tag
    ("<think>from 3.5 to 7</think> answer [1, 2]", [3.5, 7.0]),  # numbers in think are read
    ("<think>a</think><time>[10.4, 5.2]</time>", [10.4, 5.2]),  # reversed kept as read
    ("<time>[-5, 10]</time>", [5.0, 10.0]),  # unsigned: '-' is dropped
    ("<time>[1, 2, 3]</time>", [1.0, 2.0]),
    ("<time>01:05 - 01:10</time>", [1.0, 5.0]),  # no clock parsing in the official scorer
    ("<time>[5.]</time> 6", [0.0, 0.0]),  # tag found: only its content is scanned
    ("<time>[7]</time>", [0.0, 0.0]),  # fewer than two numbers
    ("no numbers", [0.0, 0.0]),
    ("", [0.0, 0.0]),
    ("<time>nan, inf</time>", [0.0, 0.0]),
    ("<time>[５, ６]</time>", [5.0, 6.0]),  # Unicode \d, as in the original regex
    (None, [0.0, 0.0]),
]


@pytest.mark.parametrize("text,expected", OFFICIAL_CASES)
def test_parse_span_official(text, expected):
    out = parse_span_official(text)
    assert out == expected and isinstance(out, list) and all(type(v) is float for v in out)


@pytest.mark.parametrize(
    "pred,gt,expected",
    [
        ([0, 5], [[0, 10]], 0.5),
        ([0, 5], [0, 10], 0.5),  # a single span is accepted too
        ([0, 5], [[20, 30], [0, 5]], 1.0),  # best over GT spans
        ([10, 0], [[0, 10]], 0.0),  # reversed pred scores 0
        ([0, 10], [[10, 0]], 0.0),  # reversed gt is length 0
        ([0.0, 0.0], [[0, 10]], 0.0),  # the parser's fallback
        ([0, 40], [[0, 20]], 0.5),  # no clamping to the video
        ([0, 5], [], 0.0),
    ],
)
def test_official_iou(pred, gt, expected):
    assert official_iou(pred, gt) == pytest.approx(expected, abs=1e-12)


def _official_reference(text: str) -> list:
    """The scorer written the obvious (quadratic-worst-case) way, to check our linear version."""
    m = re.search(r"<time>(.*?)</time>", text)
    nums = re.findall(r"\d+\.?\d*", m.group(1) if m else text)
    return [float(nums[0]), float(nums[1])] if len(nums) >= 2 else [0.0, 0.0]


_PIECES = ["<time>", "</time>", "<think>", "</think>", "\n", " ", ",", "[", "]", "-", "1", "4.5"]


@FAST
@given(st.lists(st.sampled_from(_PIECES), max_size=20).map("".join))
def test_official_parser_matches_reference_regex(text):
    assert parse_span_official(text) == _official_reference(text)


# ---------------------------------------------------------------------------------------------
# grounding_metrics
# ---------------------------------------------------------------------------------------------


def test_grounding_metrics_hand_checked():
    ious = [0.0, 0.3, 0.5, 0.7, 1.0, 0.29, 0.69]
    m = grounding_metrics(ious)
    assert m["n"] == 7
    assert m["R1@0.3"] == 100.0 * 5 / 7  # 0.3 counts (inclusive), 0.29 does not
    assert m["R1@0.5"] == 100.0 * 4 / 7  # 0.5, 0.69, 0.7, 1.0
    assert m["R1@0.7"] == 100.0 * 2 / 7  # 0.7 counts, 0.69 does not
    assert m["mIoU"] == pytest.approx(100.0 * 3.48 / 7, abs=1e-12)
    assert set(m) == {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "n"}


def test_grounding_metrics_from_spans():
    # the caller takes the best IoU per sample; every sample (also failed parses) counts
    preds = [[0, 3], [0, 5], [0, 7], [0, 10], [0.0, 0.0]]
    ious = [official_iou(p, [[0, 10]]) for p in preds]
    m = grounding_metrics(ious)
    assert (m["R1@0.3"], m["R1@0.5"], m["R1@0.7"]) == (80.0, 60.0, 40.0)
    assert m["mIoU"] == pytest.approx(100.0 * 2.5 / 5)


def test_grounding_metrics_iop_prefix():
    m = grounding_metrics([0.3, 0.5, 1.0, 0.0], thresholds=(0.3, 0.5), prefix="IoP")
    assert set(m) == {"IoP@0.3", "IoP@0.5", "mIoP", "n"}
    assert (m["IoP@0.3"], m["IoP@0.5"], m["mIoP"], m["n"]) == (75.0, 50.0, 45.0, 4)


def test_grounding_metrics_empty():
    zeros = {"R1@0.3": 0.0, "R1@0.5": 0.0, "R1@0.7": 0.0, "mIoU": 0.0, "n": 0}
    assert grounding_metrics([]) == zeros
    iop_zeros = {"IoP@0.5": 0.0, "mIoP": 0.0, "n": 0}
    assert grounding_metrics([], thresholds=(0.5,), prefix="IoP") == iop_zeros


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

coord = st.floats(-1000, 1000, allow_nan=False)
length = st.one_of(st.just(0.0), st.floats(0.01, 1000))
spans = st.builds(lambda s, n: (s, s + n), coord, length)
any_pair = st.tuples(coord, coord)  # may be reversed


@FAST
@given(any_pair, any_pair)
def test_iou_symmetric_and_bounded(a, b):
    v = temporal_iou(a, b)
    assert 0.0 <= v <= 1.0
    assert v == temporal_iou(b, a)
    assert 0.0 <= iop(a, b) <= 1.0


@FAST
@given(st.builds(lambda s, n: (s, s + n), coord, st.floats(0.01, 1000)))
def test_iou_identical_is_one(a):
    assert temporal_iou(a, a) == 1.0


@FAST
@given(spans, spans, st.floats(-1000, 1000), st.floats(0.01, 100))
def test_iou_shift_and_scale_invariant(a, b, shift, scale):
    v = temporal_iou(a, b)
    shifted = temporal_iou((a[0] + shift, a[1] + shift), (b[0] + shift, b[1] + shift))
    scaled = temporal_iou((a[0] * scale, a[1] * scale), (b[0] * scale, b[1] * scale))
    assert shifted == pytest.approx(v, abs=1e-6)
    assert scaled == pytest.approx(v, abs=1e-6)


@FAST
@given(st.text(), spans, st.one_of(st.none(), st.floats(allow_nan=True)))
def test_no_public_function_raises_and_rewards_bounded(text, gt, duration):
    for t in (text, f"<think>{text}</think><time>{text}</time>", f"<time>{text}</time>"):
        span = parse_span(t)
        assert span is None or (0.0 <= span[0] <= span[1] and math.isfinite(span[1]))
        assert format_reward(t) in (0.0, 1.0)
        reward, parts = tvg_reward(t, gt, duration)
        assert 0.0 <= reward <= 1.0 and 0.0 <= parts["iou"] <= 1.0
        pred = parse_span_official(t)
        assert len(pred) == 2 and 0.0 <= official_iou(pred, [gt]) <= 1.0


@FAST
@given(st.floats(0, 10000), st.floats(0, 10000))
def test_parse_span_round_trip(x, y):
    s, e = min(x, y), max(x, y)
    text = f"<think>t</think><time>[{s:.2f}, {e:.2f}]</time>"
    assert parse_span(text) == (float(f"{s:.2f}"), float(f"{e:.2f}"))
    assert format_reward(text) == 1.0
    assert parse_span_official(text) == [float(f"{s:.2f}"), float(f"{e:.2f}")]
