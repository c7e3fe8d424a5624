"""Rewards and metrics for video temporal grounding: parsing, IoU, format reward, R1@m / mIoU.

Pure functions only: no model, no files, no distributed code. Standard library only.

There are separate span parsers on purpose:

* `parse_span` is the REWARD parser used during GRPO. It is strict: it reads only the last complete
  `<time>...</time>` block and accepts only a clean pair of non-negative times (`[5.2, 10.4]`,
  `5.2 - 10.4`, `5.2s to 10.4s`, `[01:05.5, 1:10]`, ...). Anything else is None, so the policy gets
  no IoU for hedging ("between 1, 2 or 3"), for numbers scattered in its reasoning, or for a
  reversed span. It never raises and runs in linear time on any input.
* `parse_span_official` replicates the paper's evaluation scorer (VideoMind / TVG-R1): the first
  `<time>(.*?)</time>` on one line, else the whole response, then the first two unsigned numbers,
  else [0, 0]. It is lenient and quirky (it reads numbers inside `<think>` when there is no tag),
  but the published Charades-STA / NExT-GQA / ReXTime numbers were computed with it. Changing it
  would make our numbers incomparable with the paper, and tightening the reward parser would be
  impossible if both shared code; hence two functions. `official_iou` scores its output as read
  (no clamping, no swapping).
* `parse_span_taro` replicates TaRO's evaluation (its standalone_eval): the LAST two unsigned numbers
  anywhere, swapped when reversed. Only for comparing with TaRO's published numbers.

TaRO (grpo.py --taro) adds two pure rewards here: `taro_iou_reward`, its released training IoU reward,
and `temporal_sensitivity_bonus`, the bonus of a group's rollouts whose answer depends on the frames
around the ground-truth boundaries.
"""

import math
import re
import statistics
from typing import Optional, Sequence

ANSWER_TAG = "time"  # the paper's prompt and code use <time>, its text says <answer>: see SPEC.md
THINK_TAG = "think"

Span = tuple[float, float]

# ---------------------------------------------------------------------------------------------
# Reward parser
# ---------------------------------------------------------------------------------------------

# One time value: seconds ("5", "5.2", "5.") or clock time ("1:10", "01:05.5", "1:02:03.5").
# [0-9] rather than \d: \d matches full-width and other Unicode digits, which float() accepts.
_TIME = r"([0-9]+(?::[0-9]{2}){0,2}(?:\.[0-9]*)?)(?: ?(?:s|secs?|seconds?))?"
# Separators: "," or "-" with optional spaces, or " to ". Negative numbers can never match because
# every time starts with a digit. Whitespace is collapsed to single spaces before matching, so no
# two unbounded quantifiers ever compete for the same characters (no catastrophic backtracking).
_SPAN_RE = re.compile(_TIME + r"(?: ?[,-] ?| to )" + _TIME)


def _time_to_seconds(token: str) -> Optional[float]:
    """'65.5' -> 65.5, '01:05.5' -> 65.5, '1:02:03' -> 3723.0; None if a clock field is >= 60."""
    fields = token.split(":")
    later = [float(f) for f in fields[1:]]  # minutes/seconds after the leading field
    if any(f >= 60 for f in later):
        return None
    seconds = 0.0
    for f in [float(fields[0])] + later:
        seconds = seconds * 60 + f
    return seconds


def _last_block(text: str, tag: str) -> Optional[str]:
    """Content of the last complete <tag>...</tag>: the last closing tag and the nearest opening
    tag before it. So `<t>a</t> <t>b</t>` -> 'b', `<t><t>a</t>` -> 'a' (innermost), and a trailing
    unclosed `<t>b` is ignored. str.rfind keeps this linear on any input."""
    open_, close = f"<{tag}>", f"</{tag}>"
    end = text.rfind(close)
    if end < 0:
        return None
    start = text.rfind(open_, 0, end)
    if start < 0:
        return None
    return text[start + len(open_) : end]


def parse_span(text: object, tag: str = ANSWER_TAG) -> Optional[Span]:
    """(start, end) in seconds from the last complete <time> block, or None. Never raises.

    None for: no complete block, one or three numbers, NaN/inf/overflow, negative times,
    start > end, unbalanced brackets, anything else. start == end is returned."""
    if not isinstance(text, str) or not isinstance(tag, str):
        return None
    content = _last_block(text, tag)
    if content is None:
        return None
    body = " ".join(content.split())  # collapse whitespace and newlines; linear
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1].strip()
    match = _SPAN_RE.fullmatch(body)
    if match is None:
        return None
    start, end = _time_to_seconds(match.group(1)), _time_to_seconds(match.group(2))
    if start is None or end is None or not (math.isfinite(start) and math.isfinite(end)):
        return None  # a 400-digit number overflows to inf
    if start > end:
        return None
    return (start, end)


# ---------------------------------------------------------------------------------------------
# IoU / IoP
# ---------------------------------------------------------------------------------------------


def temporal_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [start, end] spans, in [0, 1], symmetric.

    A reversed span (start > end) has length max(0, end - start) = 0, so it intersects nothing.
    An empty union (e.g. both spans zero-length at the same point) gives 0.0, not 1.0: a point
    prediction carries no extent to reward. Non-finite inputs give 0.0."""
    a0, a1 = float(a[0]), float(a[1])
    b0, b1 = float(b[0]), float(b[1])
    if not all(math.isfinite(v) for v in (a0, a1, b0, b1)):
        return 0.0
    inter = max(0.0, min(a1, b1) - max(a0, b0))  # negative (-> 0) whenever either is reversed
    union = max(0.0, a1 - a0) + max(0.0, b1 - b0) - inter
    if union <= 0.0:
        return 0.0
    return min(1.0, inter / union)  # min() only guards against a last-ulp overshoot


def iop(pred: Sequence[float], gt: Sequence[float]) -> float:
    """Intersection over the PREDICTED length (NExT-GQA's IoP), in [0, 1]. 0.0 when the
    prediction has zero length (or is reversed) or any value is non-finite."""
    p0, p1, g0, g1 = float(pred[0]), float(pred[1]), float(gt[0]), float(gt[1])
    if not all(math.isfinite(v) for v in (p0, p1, g0, g1)) or p1 - p0 <= 0.0:
        return 0.0
    inter = max(0.0, min(p1, g1) - max(p0, g0))
    return min(1.0, inter / (p1 - p0))


def _as_spans(gt: Sequence) -> list:
    """Accept one span [s, e] or a list of spans [[s, e], ...]. Malformed gt raises: it is a bug
    in the data, not something a reward should hide."""
    if len(gt) == 2 and not hasattr(gt[0], "__len__"):  # numbers, not spans (numpy-safe)
        return [gt]
    return list(gt)


# ---------------------------------------------------------------------------------------------
# Training reward
# ---------------------------------------------------------------------------------------------


def format_reward(text: object, tag: str = ANSWER_TAG) -> float:
    """1.0 iff the response is exactly `<think>...</think>` then `<time>...</time>` (whitespace
    allowed before, between and after), each tag appears exactly once in the whole text, and the
    time content parses with `parse_span`. An empty <think></think> is allowed. Else 0.0."""
    if not isinstance(text, str) or not isinstance(tag, str):
        return 0.0
    t_open, t_close = f"<{THINK_TAG}>", f"</{THINK_TAG}>"
    a_open, a_close = f"<{tag}>", f"</{tag}>"
    if any(text.count(s) != 1 for s in (t_open, t_close, a_open, a_close)):
        return 0.0  # also rejects a <time> nested inside <think>
    s = text.strip()
    if not (s.startswith(t_open) and s.endswith(a_close)):
        return 0.0
    think_end, answer_start = s.index(t_close), s.index(a_open)
    if think_end > answer_start or s[think_end + len(t_close) : answer_start].strip():
        return 0.0
    return 1.0 if parse_span(s, tag) is not None else 0.0


def _clamp(span: Sequence[float], duration: Optional[float]) -> Span:
    s, e = float(span[0]), float(span[1])
    if duration is None or not math.isfinite(duration) or duration <= 0:
        return (s, e)  # unknown duration: score the span as is
    return (min(max(s, 0.0), duration), min(max(e, 0.0), duration))


def tvg_reward(
    text: object,
    gt: Sequence,
    duration: Optional[float],
    w_iou: float = 0.9,
    w_format: float = 0.1,
) -> tuple[float, dict]:
    """The paper's reward r = w_iou * IoU + w_format * format, in [0, 1] when the weights sum to 1.

    The parsed span and every GT span are clamped to [0, duration] before IoU, so overshooting the
    end of the video is not punished beyond what the video contains. With duration None, <= 0 or
    non-finite there is no clamping. An unparseable answer has IoU 0. gt is one [s, e] or a list of
    spans (best IoU wins).
    Returns (reward, {"iou": float, "format": float, "span": parsed (unclamped) span or None})."""
    span = parse_span(text)
    fmt = format_reward(text)
    iou = 0.0
    if span is not None:
        pred = _clamp(span, duration)
        iou = max((temporal_iou(pred, _clamp(g, duration)) for g in _as_spans(gt)), default=0.0)
    return w_iou * iou + w_format * fmt, {"iou": iou, "format": fmt, "span": span}


# ---------------------------------------------------------------------------------------------
# TaRO's rewards (grpo.py --taro). Released code: github oceanflowlab/TaRO @ 143a234, src/rewards.py
# and verl/workers/fsdp_workers.py (compute_temporal_log_prob).
# ---------------------------------------------------------------------------------------------


def taro_iou_reward(pred: Optional[Sequence[float]], gt: Sequence, duration: Optional[float]) -> float:
    """TaRO's training IoU reward: IoU * (1 - |ds| / D) * (1 - |de| / D), ds = pred start - GT start,
    de = pred end - GT end, D the video's duration: full IoU also needs both boundaries close.

    pred is a parsed span (`parse_span`) or None (unparseable -> 0). gt is one [s, e] or a list of
    spans: the best product over them. Both spans are clamped to [0, D] first, so |ds|, |de| <= D and
    the reward lies in [0, 1]. TaRO clips only the GT (start to >= 0, end to <= D) and not the
    prediction, so there an answer past the end of the video can score below 0 ([0, 3D] against
    [0, D]: IoU 1/3 times (1 - 2) = -1/3); we clamp the prediction as `tvg_reward` does (the video
    holds nothing after D). With D None, <= 0 or non-finite (TaRO would raise): plain best IoU."""
    if pred is None or not all(math.isfinite(float(v)) for v in pred):
        return 0.0
    known = duration is not None and math.isfinite(duration) and duration > 0
    best = 0.0
    for g in _as_spans(gt):
        p, g = _clamp(pred, duration), _clamp(g, duration)
        r = temporal_iou(p, g)
        if known:
            r *= (1 - abs(p[0] - g[0]) / duration) * (1 - abs(p[1] - g[1]) / duration)
        best = max(best, r)
    return best


def temporal_sensitivity_bonus(
    drops: Sequence[float],
    ious: Sequence[float],
    alpha: float = 0.3,
    iou_min: float = 0.7,
    margin: float = 0.0,
) -> list[float]:
    """TaRO's temporal-sensitivity reward for ONE group (the G rollouts of one prompt): one bonus each.

    drops[i] = d_i, the masked token mean of log pi(y_t | V) - log pi(y_t | V') over rollout i's whole
    response, V' the video with the frames around the GT boundaries shuffled
    (data.shuffle_boundary_frames): how much the answer relied on those frames. ious[i] is rollout i's
    plain IoU. bonus_i = alpha if d_i > mean(d) + margin and ious[i] >= iou_min, else 0 (defaults:
    TaRO's released alpha 0.3, IoU 0.7, margin 0). Any G >= 1; with G = 1 the mean is the rollout's own
    drop, so there is never a bonus. A non-finite drop (a NaN log-prob, an empty response) gets no
    bonus and is left out of the mean. The mean is exact (statistics.mean), so equal drops never earn
    a bonus from rounding: a float mean of five 0.235 is one ulp below 0.235.

    Where we differ from TaRO's released code:
    * Per rollout. Their G rollouts share one `extra_info` dict, so every rollout is judged by the
      LAST rollout's drop; the method (and this function) judges each rollout by its own.
    * Any G. Their threshold is `diff.view(-1, 8).mean(-1)`: G = 8 hard-coded, and each rank's shard
      must hold whole groups.
    * One perturbation per group is the training loop's business, not this function's: all G drops
      must be measured against the same V' (one shuffle_boundary_frames call per prompt). TaRO
      shuffles each rollout's video separately, so its group mean compares drops on different videos."""
    if len(drops) != len(ious):
        raise ValueError(f"one IoU per drop: got {len(drops)} drops and {len(ious)} IoUs")
    finite = [float(d) for d in drops if math.isfinite(d)]
    if not finite:
        return [0.0] * len(drops)
    tau = statistics.mean(finite) + margin
    return [alpha if math.isfinite(d) and d > tau and iou >= iou_min else 0.0 for d, iou in zip(drops, ious)]


# ---------------------------------------------------------------------------------------------
# Official evaluation (replicates the VideoMind / TVG-R1 scorer, and TaRO's; do not "fix" them)
# ---------------------------------------------------------------------------------------------

_OFFICIAL_NUM_RE = re.compile(r"\d+\.?\d*")  # Unicode \d on purpose: that is what the scorer does


def _first_tag_on_one_line(text: str) -> Optional[str]:
    """Same result as re.search(r'<time>(.*?)</time>', text).group(1) (no DOTALL), in linear time:
    the regex form is quadratic on a long line full of unclosed <time> tags. Per line, if the
    first <time> has no </time> after it, no later <time> on that line can have one either."""
    open_, close = f"<{ANSWER_TAG}>", f"</{ANSWER_TAG}>"
    for line in text.split("\n"):  # '.' without DOTALL stops only at '\n'
        p = line.find(open_)
        if p >= 0:
            q = line.find(close, p + len(open_))
            if q >= 0:
                return line[p + len(open_) : q]
    return None


def first_two_numbers(text: str) -> list[float]:
    """The scorer's number rule: the first two unsigned numbers (r'\\d+\\.?\\d*') in text, or [0.0, 0.0]
    if there are fewer than two (its [[]] -> [[0, 0]]; one number fails its IoU -> 0 as well)."""
    nums = []
    for m in _OFFICIAL_NUM_RE.finditer(text):
        nums.append(float(m.group()))
        if len(nums) == 2:
            return nums
    return [0.0, 0.0]


def parse_span_official(text: object) -> list[float]:
    """[start, end] as the paper's scorer reads it: the first two unsigned numbers inside the first
    one-line <time>...</time>, or in the whole response if there is none; [0.0, 0.0] if fewer than
    two numbers. No validation: the span may be reversed or past the end of the video."""
    if not isinstance(text, str):
        return [0.0, 0.0]
    content = _first_tag_on_one_line(text)
    return first_two_numbers(text if content is None else content)


# TaRO's pattern (standalone_eval/evaluate_vtg.py): unlike the VideoMind one, a dot needs a digit after
# it, so "5." reads 5 and ".5" reads 5 (the same values); "-2" reads 2; "01:05" reads 1 and 5.
_TARO_NUM_RE = re.compile(r"\d+(?:\.\d+)?")  # Unicode \d, as in their Python code


def parse_span_taro(text: object) -> Optional[list[float]]:
    """[start, end] as TaRO's released evaluation reads it (extract_time in oceanflowlab/TaRO @ 143a234,
    standalone_eval/evaluate_vtg.py): the LAST two unsigned numbers anywhere in the response, tags or
    not, swapped when the first is larger. None when there are fewer than two (their [None, None],
    IoU 0). No clamping; a number too long for a float reads inf and scores 0."""
    if not isinstance(text, str):
        return None
    last_two = []
    for m in _TARO_NUM_RE.finditer(text):  # keep only the last two: linear time, constant memory
        last_two = [last_two[-1], m.group()] if last_two else [m.group()]
    if len(last_two) < 2:
        return None
    s, e = float(last_two[0]), float(last_two[1])
    return [e, s] if s > e else [s, e]


def official_iou(pred: Sequence[float], gt_spans: Sequence) -> float:
    """Best IoU of pred (as read: reversed -> 0) over the GT spans (one [s, e] or a list)."""
    return max((temporal_iou(pred, g) for g in _as_spans(gt_spans)), default=0.0)


def grounding_metrics(
    values: Sequence[float], thresholds: Sequence[float] = (0.3, 0.5, 0.7), prefix: str = "R1"
) -> dict:
    """Recall at each threshold and the mean, in PERCENT, full float precision, plus n.

    values: one IoU per sample (already the best over that sample's GT spans); every sample counts.
    prefix="R1" -> {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "n"}; prefix="IoP" (values are IoPs, for
    NExT-GQA) -> {"IoP@0.3", ..., "mIoP", "n"}. A sample counts at m when value >= m, compared
    exactly, with no epsilon the paper's scorer did not use: IoUs from whole-second spans such as
    [0, 3] vs [0, 10] are exactly 0.3 (float division is correctly rounded), but decimal spans such
    as [1.1, 4.1] vs [1.1, 11.1] land one ulp below 0.3 (4.1 - 1.1 != 3.0) and do not count.
    Empty values -> every metric 0.0 and n = 0."""
    n = len(values)
    mean_key = "mIoU" if prefix == "R1" else f"m{prefix}"
    if n == 0:
        return {**{f"{prefix}@{m:g}": 0.0 for m in thresholds}, mean_key: 0.0, "n": 0}
    out = {f"{prefix}@{m:g}": 100.0 * sum(v >= m for v in values) / n for m in thresholds}
    out[mean_key] = 100.0 * math.fsum(values) / n
    out["n"] = n
    return out
