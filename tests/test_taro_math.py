"""TaRO's pure parts on hand-computed cases: the temporal-sensitivity bonus and the IoU reward
(reward.py), the shuffled boundary frames and the guided prefix (data.py), the curriculum, the guided
advantage rule and the guided rows of the loss (grpo.py)."""
import math

import pytest
import torch

import annotate
import data
import grpo
from reward import taro_iou_reward, temporal_sensitivity_bonus

# -----------------------------------------------------------------------------
# The temporal-sensitivity bonus: alpha if d_i > mean(d) + margin and IoU_i >= iou_min


def test_bonus_g2_each_rollout_by_its_own_drop():
    # mean 0.3: only the first drop is above it (TaRO's shared dict would give both the last drop's verdict)
    assert temporal_sensitivity_bonus([0.5, 0.1], [0.8, 0.9]) == [0.3, 0.0]
    assert temporal_sensitivity_bonus([0.1, 0.5], [0.8, 0.9]) == [0.0, 0.3]


def test_bonus_g5_iou_threshold_is_inclusive():
    # mean 0.75 exactly: 1.0 and 1.25 are above it; 0.75 itself is not (strict >)
    drops = [0.25, 0.5, 0.75, 1.0, 1.25]
    assert temporal_sensitivity_bonus(drops, [1.0, 1.0, 1.0, 0.69, 0.7]) == [0.0, 0.0, 0.0, 0.0, 0.3]
    assert temporal_sensitivity_bonus(drops, [1.0] * 5, alpha=1.0) == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert temporal_sensitivity_bonus(drops, [0.5] * 5) == [0.0] * 5  # every IoU below 0.7: no bonus


def test_bonus_g8_with_margin():
    drops = [-0.5, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0, -1.25]  # sum 5, mean 0.625
    ious = [0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.95, 0.9]
    assert temporal_sensitivity_bonus(drops, ious) == [0, 0, 0, 0, 0.3, 0, 0.3, 0]  # 2.0 has IoU 0.5
    assert temporal_sensitivity_bonus(drops, ious, margin=0.5) == [0, 0, 0, 0, 0, 0, 0.3, 0]  # 1.0 < 1.125


def test_bonus_g1_and_equal_drops_give_nothing():
    assert temporal_sensitivity_bonus([5.0], [1.0]) == [0.0]  # the mean is its own drop
    assert temporal_sensitivity_bonus([], []) == []
    # a float mean of five 0.235 lands one ulp below 0.235: every rollout would get the bonus
    assert sum([0.235] * 5) / 5 < 0.235 and math.fsum([0.235] * 5) / 5 < 0.235
    assert temporal_sensitivity_bonus([0.235] * 5, [1.0] * 5) == [0.0] * 5
    assert temporal_sensitivity_bonus([0.173] * 3, [1.0] * 3) == [0.0] * 3


def test_bonus_non_finite_drops_are_left_out():
    nan, inf = float("nan"), float("inf")
    # the mean is over 1.0 and 0.0 only (with inf in it nothing would pass, with nan neither)
    assert temporal_sensitivity_bonus([nan, 1.0, 0.0, inf], [1.0] * 4) == [0.0, 0.3, 0.0, 0.0]
    assert temporal_sensitivity_bonus([nan, -inf], [1.0, 1.0]) == [0.0, 0.0]
    assert temporal_sensitivity_bonus([1.0, 0.0], [nan, 1.0]) == [0.0, 0.0]  # a NaN IoU passes no threshold
    with pytest.raises(ValueError, match="one IoU per drop"):
        temporal_sensitivity_bonus([1.0, 0.0], [1.0])


# -----------------------------------------------------------------------------
# TaRO's IoU reward: IoU * (1 - |ds| / D) * (1 - |de| / D), spans clamped to [0, D]


@pytest.mark.parametrize("pred, gt, duration, want", [
    ([2, 8], [2, 8], 10, 1.0),
    ([2, 6], [2, 8], 10, (4 / 6) * 1.0 * 0.8),  # IoU 2/3, the end 2 s off: 1 - 2/10
    ([1, 6], [2, 8], 10, (4 / 7) * 0.9 * 0.8),
    ([0, 5], [5, 10], 10, 0.0),  # touching: IoU 0
    ([0, 10], [-2, 12], 10, 1.0),  # the GT is clipped to the video first (unclipped IoU 10/14)
    ([5, 15], [4, 8], 10, 0.5 * 0.9 * 0.8),  # pred clamped to [5, 10]: IoU 3/6, ds 1, de 2
    ([0, 30], [0, 10], 10, 1.0),  # clamped, where TaRO's unclamped pred gives 1/3 * (1 - 20/10) = -1/3
    ([4, 6], [[0, 2], [4, 8]], 10, 0.5 * 0.8),  # several GT spans: the best product
    ([8, 2], [2, 8], 10, 0.0),  # reversed: no extent
    ([2, 6], [2, 8], None, 4 / 6),  # no duration: plain IoU
    ([2, 6], [2, 8], 0, 4 / 6),
    ([2, 6], [2, 8], -1.0, 4 / 6),
    ([2, 6], [2, 8], float("nan"), 4 / 6),
    (None, [2, 8], 10, 0.0),  # unparseable answer
    ([float("nan"), 6], [2, 8], 10, 0.0),
    ([0, float("inf")], [0, 10], 10, 0.0),  # not clamped into a perfect answer
])
def test_taro_iou_reward(pred, gt, duration, want):
    assert taro_iou_reward(pred, gt, duration) == pytest.approx(want, abs=1e-12)


# -----------------------------------------------------------------------------
# The shuffled boundary frames


def numbered_frames(t: int) -> torch.Tensor:
    """(T, 3, 2, 2) frames whose every pixel holds the frame's index."""
    return torch.arange(t, dtype=torch.float32).view(t, 1, 1, 1).expand(t, 3, 2, 2).clone()


def order(frames: torch.Tensor) -> list[int]:
    assert torch.equal(frames, frames[:, :1, :1, :1].expand_as(frames))  # whole frames moved, never pixels
    return [int(v) for v in frames[:, 0, 0, 0]]


TIMES = [k / 2 for k in range(12)]  # 12 frames at 2 fps: 0.0, 0.5, ..., 5.5 s


def test_frame_times_from_the_video_metadata():
    assert data.frame_times({"fps": 4.0, "frames_indices": [0, 4, 8, 13]}) == [0.0, 1.0, 2.0, 3.25]
    assert data.frame_times({"fps": 2, "frames_indices": torch.tensor([0, 3])}) == [0.0, 1.5]  # torchvision's


def test_shuffle_moves_only_the_two_windows():
    frames = numbered_frames(12)
    before = frames.clone()
    seen = set()
    for seed in range(20):
        out = order(data.shuffle_boundary_frames(frames, TIMES, (1.0, 4.0), 0.5, torch.Generator().manual_seed(seed)))
        # start window: |t - 1| <= 0.5 -> 0.5, 1.0, 1.5 s (frames 1-3, ends included); end: 3.5-4.5 s (7-9)
        assert [out[k] for k in (0, 4, 5, 6, 10, 11)] == [0, 4, 5, 6, 10, 11]
        assert sorted(out[1:4]) == [1, 2, 3] and sorted(out[7:10]) == [7, 8, 9]
        seen.add(tuple(out))
    assert len(seen) > 1  # it does shuffle
    assert torch.equal(frames, before)  # the input is not modified


def test_shuffle_is_deterministic_for_a_seed():
    frames, times = numbered_frames(12), torch.tensor(TIMES)  # times as a tensor work too
    a = data.shuffle_boundary_frames(frames, times, (1.0, 4.0), 1.0, torch.Generator().manual_seed(7))
    b = data.shuffle_boundary_frames(frames, times, (1.0, 4.0), 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_shuffle_leaves_a_window_of_one_frame():
    frames = numbered_frames(12)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(data.shuffle_boundary_frames(frames, TIMES, (1.0, 4.0), 0.2, g), frames)  # one frame each
        out = order(data.shuffle_boundary_frames(frames, TIMES, (1.0, 4.1), 0.5, g))  # end window: 3.6-4.6 s -> 4.0, 4.5
        assert [out[k] for k in (0, 4, 5, 6, 7, 10, 11)] == [0, 4, 5, 6, 7, 10, 11]
        assert sorted(out[1:4]) == [1, 2, 3] and sorted(out[8:10]) == [8, 9]
    # no frame near either boundary
    assert torch.equal(data.shuffle_boundary_frames(frames, TIMES, (20.0, 30.0), 1.0, g), frames)


def test_shuffle_overlapping_windows_share_no_frame():
    # start window 0.25-1.75 s: frames 1, 2, 3; end window 1.25-2.75 s: frames 3, 4, 5, but 3 is the start's
    frames = numbered_frames(12)
    for seed in range(20):
        out = order(data.shuffle_boundary_frames(frames, TIMES, (1.0, 2.0), 0.75, torch.Generator().manual_seed(seed)))
        assert sorted(out[1:4]) == [1, 2, 3] and sorted(out[4:6]) == [4, 5]
        assert out[0] == 0 and out[6:] == list(range(6, 12))


# -----------------------------------------------------------------------------
# The guided prefix

CAPTIONS = [{"start": 10, "end": 14, "text": "a bar in red moves across the screen"},  # not in time order
            {"start": 1, "end": 4.5, "text": "a circle in blue moves across the screen."},
            {"start": 5, "end": 8, "text": "a square in green moves across the screen"}]
QUERY = "when does the red bar appear?"
HEAD = "<think>\nI need to find the specific moment when does the red bar appear?\n"
LINES = ["A circle in blue moves across the screen from 1.00 s to 4.50 s.",
         "A square in green moves across the screen from 5.00 s to 8.00 s.",
         "A bar in red moves across the screen from 10.00 s to 14.00 s."]


def test_guided_prefix_exact_text_for_a_seed():
    text = data.guided_prefix(QUERY, CAPTIONS, torch.Generator().manual_seed(3))
    assert text == HEAD + LINES[0] + "\n" + LINES[2]


def test_guided_prefix_is_a_nonempty_subset_in_time_order():
    subsets = set()
    for seed in range(300):
        text = data.guided_prefix(QUERY, CAPTIONS, torch.Generator().manual_seed(seed))
        assert text.startswith(HEAD)
        picked = [LINES.index(line) for line in text[len(HEAD):].split("\n")]  # each line is a caption's
        assert picked and picked == sorted(set(picked))  # non-empty, no repeats, in time order
        subsets.add(tuple(picked))
    assert len(subsets) == 7  # every non-empty subset of 3, so every size 1, 2, 3 is reached


def test_guided_prefix_edges():
    g = torch.Generator().manual_seed(0)
    assert data.guided_prefix(QUERY, None, g) is None and data.guided_prefix(QUERY, [], g) is None
    one = [{"start": 0, "end": 2, "text": "a dog barks"}]
    assert data.guided_prefix(" the dog barks ", one, g) == ("<think>\nI need to find the specific moment the dog "
                                                            "barks.\nA dog barks from 0.00 s to 2.00 s.")
    assert data.guided_prefix("the dog barks.", one, g).startswith("<think>\nI need to find the specific moment "
                                                                   "the dog barks.\nA dog")


def test_caption_lines_are_the_captions_teachers_sentences():
    # The tiny model is SFT-trained on annotate.caption_answer: the prefix must use its very sentences.
    s = data.Sample(id="x", video="v.mp4", duration=20.0, query=QUERY, spans=[[10.0, 14.0]], captions=CAPTIONS)
    cot = annotate.caption_answer(s, noise=0.0, seed=0)
    assert LINES[0] in cot and LINES[1] in cot  # the third is marked "(the query)" by the teacher


# -----------------------------------------------------------------------------
# The curriculum, the guided advantage rule and the guided rows of the loss


@pytest.mark.parametrize("step, guided_steps, p0, want", [
    (1, 5, 1.0, 1.0), (2, 5, 1.0, 0.75), (3, 5, 1.0, 0.5), (4, 5, 1.0, 0.25), (5, 5, 1.0, 0.0), (6, 5, 1.0, 0.0),
    (1000, 5, 1.0, 0.0),
    (1, 3, 0.5, 0.5), (2, 3, 0.5, 0.25), (3, 3, 0.5, 0.0),
    (0, 5, 1.0, 1.0),  # before the first step: p0, not above it
    (1, 0, 1.0, 0.0), (50, 0, 1.0, 0.0),  # guided_steps = 0: never guided
    (1, 1, 0.8, 0.8), (2, 1, 0.8, 0.0),  # a one-step schedule
])
def test_guided_probability(step, guided_steps, p0, want):
    assert grpo.guided_probability(step, guided_steps, p0) == pytest.approx(want, abs=1e-12)


def test_guided_advantages_keep_only_the_positive_part():
    adv = torch.tensor([[1.0, -0.5, -0.5], [0.8, -0.8, 0.0]])
    guided = torch.tensor([[True, True, False], [False, True, True]])
    assert torch.equal(grpo.guided_advantages(adv, guided), torch.tensor([[1.0, 0.0, -0.5], [0.8, 0.0, 0.0]]))
    # after the group normalisation, which counts the guided rollouts: rewards 1, 0, 0, 1 -> A = +-0.866
    a = grpo.guided_advantages(grpo.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]])),
                               torch.tensor([[True, True, False, False]]))
    want = torch.tensor([[1.0, 0.0, -1.0, 1.0]], dtype=a.dtype) * 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert torch.allclose(a, want)


def guided_case(ratio0: float):
    """Row 0 guided (A = 1, ratio ratio0), row 1 not (A = -0.5, ratio 1); 5 completion tokens."""
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, -4.0]])
    logp = (old + torch.tensor([[math.log(ratio0)] * 3, [0.0] * 3])).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return logp, old, torch.tensor([[1.0], [-0.5]]), mask


@pytest.mark.parametrize("ratio0", [0.5, 1.0, 1.5, 3.0])
def test_grpo_loss_guided_row_is_minus_a_logp_whatever_the_ratio(ratio0):
    logp, old, adv, mask = guided_case(ratio0)
    loss, st = grpo.grpo_loss(logp, old, adv, mask, guided=torch.tensor([True, False]))
    loss.backward()
    # d/dlogp: guided row -A / n = -1/5 on its 2 tokens; the other row -ratio * A / n = 0.5 / 5 (ratio 1, inside the clip)
    assert torch.allclose(logp.grad, torch.tensor([[-0.2, -0.2, 0.0], [0.1, 0.1, 0.1]]))
    guided_sum = -(logp[0, 0] + logp[0, 1]).item()  # -A * logp over the masked tokens, A = 1
    assert loss.item() == pytest.approx((guided_sum + 3 * 0.5) / 5)
    assert st["guided_frac"] == pytest.approx(2 / 5) and st["clip_frac"] == 0.0  # a guided row is never clipped
    assert st["ratio"] == pytest.approx((2 * ratio0 + 3) / 5)


def test_grpo_loss_guided_shapes_and_none():
    logp, old, adv, mask = guided_case(1.5)
    loss, st = grpo.grpo_loss(logp, old, adv, mask)  # unguided, the ratio 1.5 is clipped at 1.2 (A > 0)
    loss.backward()
    assert torch.allclose(logp.grad[0], torch.zeros(3)) and "guided_frac" not in st and st["clip_frac"] == 2 / 5
    for g in (torch.tensor([True, False]), torch.tensor([[True], [False]])):  # (B,) or (B, 1)
        logp.grad = None
        loss, _ = grpo.grpo_loss(logp, old, adv, mask, guided=g)
        loss.backward()
        assert torch.allclose(logp.grad[0], torch.tensor([-0.2, -0.2, 0.0]))
    # no row guided: exactly the unguided loss
    plain, _ = grpo.grpo_loss(logp, old, adv, mask)
    none_guided, st = grpo.grpo_loss(logp, old, adv, mask, guided=torch.tensor([False, False]))
    assert none_guided.item() == plain.item() and st["guided_frac"] == 0.0
