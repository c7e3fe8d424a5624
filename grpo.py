"""GRPO: the RL stage of VTG-R1, whole in one file (rollouts, reward, group advantages, clipped update).

    # CPU, the tiny preset (a few minutes on 2 cores)
    python grpo.py --model runs/tiny/sft/model --data runs/tiny/annotate/rl.jsonl --out runs/tiny/grpo \
        --group-size 8 --prompts-per-step 4 --steps 20 --lr 5e-5 --max-new-tokens 160 \
        --nframes 16 --max-pixels 3136 --min-pixels 3136
    # 1 GPU: AdamW keeps ~16 bytes/parameter of model states, so one 80 GB GPU takes the 3B, not the 7B
    python grpo.py --model runs/sft3b/model --data rl.jsonl --out runs/grpo3b --prompts-per-step 16 --grad-ckpt
    # 1 node of 8 GPUs (ZeRO-3; weights gathered once per rollout instead of once per token)
    torchrun --nproc_per_node 8 grpo.py --model runs/paper/sft/model --data rl.jsonl --out runs/paper/grpo \
        --zero-stage 3 --grad-ckpt --gather-for-rollout
    # the paper: 2 nodes x 8 H100 (hostfile lines: "node1 slots=8"); add --resume to continue a killed run
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 grpo.py --model runs/paper/sft/model \
        --data rl.jsonl --out runs/paper/grpo --zero-stage 3 --grad-ckpt --gather-for-rollout

Defaults are the paper's: G = 8 samples per prompt, 128 prompts per step, 600 steps, lr 1e-6,
temperature 1.0, 2048 new tokens, reward 0.9 * IoU + 0.1 * format against the ORIGINAL ground truth
(reward.tvg_reward), KL beta = 0, 64 frames of at most 128*28*28 pixels.

Where we are explicit about choices the paper's formula leaves open (or where we differ):
* Advantage: A_i = (r_i - mean) / (std + 1e-6) over the G samples of a prompt, std with Bessel's
  correction (torch.std, as in verl/TRL). A group of equal rewards gives A = 0; so does a group of one
  (no baseline to compare with).
* Surrogate: min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) per token, rho = pi / pi_old, with
  eps = eps_high = 0.2 unless --clip-eps-high is set (DAPO's "clip higher"). pi_old is the policy that
  generated the rollouts: its log-probs are computed once, after generation and before any update.
  With one optimizer step per rollout batch (mu = 1, one mini-batch) pi_old = pi, so they are the
  current log-probs detached: rho = 1, no extra forward.
* Loss averaging: the mean over ALL completion tokens of the mini-batch, across ranks (DAPO's
  token-level mean), not the paper's 1/G sum_i 1/|o_i| sum_t (a per-sequence mean that makes every
  token of a long answer count less).
* KL: beta = 0 by default, and then no reference model is loaded or run at all. With beta > 0, a frozen
  copy of --model and the k3 estimator exp(ref - logp) - (ref - logp) - 1 per token, added to the loss.
* Entropy bonus: - entropy_coef * token-mean entropy, 0 by default (the authors' released run: 1e-3).
* mu: --mu passes over each rollout batch, each split into optimizer steps of --mini-batch prompts.
  The authors' released run (256 prompts, 4 optimizer steps per rollout) is --prompts-per-step 256
  --mini-batch 64.
* Dynamic sampling: --drop-uniform-groups leaves groups of equal rewards out of the loss (they carry
  no signal); unlike DAPO we do not sample more prompts to refill the batch.
* Sampling: temperature 1.0, top-p 1, top-k off, no repetition penalty, all set explicitly over the
  checkpoint's generation config (Qwen2.5-VL-Instruct's has a 1.05 repetition penalty). An answer ends
  at the checkpoint's EOS or the pad token <|endoftext|>. Vision tokens are never sampled, and they
  are removed from the log-prob distribution too, so pi is exactly the distribution sampled from;
  log-probs use the sampling temperature.
* AdamW, constant learning rate, gradient clipping 1.0.

TaRO (seed 002, "Temporal-Aware Reasoning Optimization"), three parts on top of the above, `--taro`
for all of them with TaRO's released constants, or each with its own flags:
* Guided rollouts (--guided-steps, --guided-p0). A rollout is guided with probability p(step), drawn
  per rollout (a group may mix both), p decaying linearly from p0 = 1 to 0 over --guided-steps steps
  (--taro: one epoch of the RL set). A guided rollout continues from `<think>\nI need to find the
  specific moment {query}.\n` + a random non-empty, time-ordered subset of the sample's dense captions
  with their times (data.guided_prefix; no ground truth); the prefix counts as completion in the loss.
  Guided rollouts are off-policy: after the group's normalisation A = max(A, 0), and their loss is
  -A * log pi with no ratio and no clip (TaRO's released "mask" mode). A guided row continues the
  prompt's one prefill with its prefix (model.generate_from_prefixes: guided and free rows of a
  rollout chunk in one generate call, the video encoded and the prompt prefilled once per prompt),
  and an answer is cut at --max-new-tokens counting its prefix.
* Temporal-sensitivity reward (--tsr-alpha, --tsr-radius, --tsr-iou-min, --tsr-margin). For each
  rollout, d_i = the token mean over its completion of log pi(y|V) - log pi(y|V'), V' the video with
  the frames within r s of the GT start shuffled among themselves and likewise around the end; bonus
  alpha when d_i > the group's mean d + margin and the rollout's IoU >= 0.7, added to our reward.
  Computed by the policy at rollout time (no reference model) in two no-grad forwards per group (the
  first is also pi_old); per rollout for any G, with ONE V' per group (temporal_drops).
* --iou-reward taro: TaRO's training IoU, IoU * (1 - |ds|/D) * (1 - |de|/D) (reward.taro_iou_reward).
Where TaRO's released code (oceanflowlab/TaRO @ 143a234) differs, we follow the method as described:
its bonus is shared by a whole group (all rollouts hold one dict: the last rollout's drop), G = 8 is
hard-coded, each rollout gets its own V', its curriculum is a hard switch after the first epoch (the
smooth schedule exists behind a flag left off), and a long prefix can push the answer past the limit.

What is shared across the G samples of a prompt (STACK.md, measured; `bench.py` times it): the video
is decoded and run through the vision encoder ONCE per prompt, the prompt is prefilled once and its KV
cache held once while the G answers are sampled (their attention reads the prompt's keys once per
prompt: model.shared_prefix_attention; only their own tokens are cached per answer), and the training
forward runs the prompt (video included) ONCE per group, forward and backward, in one packed row
(--update packed, the default; model.py builds it):

    input_ids   [ prompt (Lp) | c_1 (n_1) | c_2 (n_2) | ... | c_G (n_G) ]    (1, T), T = Lp + sum n_i
    positions   prompt: its own 3-D ids (3, Lp); c_i: prompt's last + 1 + (0 .. n_i - 1), as in [prompt; c_i]
    attention   causal, and c_i sees the prompt and itself, never c_j: two SDPA calls, the prompt's
                (Lp x Lp, causal) and the completions' as a batch (G, C) x (Lp + C), C = max n_i
    log-probs   token 0 of every c_i from the prompt's last state, token j from c_i's state j - 1   (N = sum n_i)

The forward returns hidden states, not logits; lm_head and the log-softmax run over the N predicting
states in chunks (model.token_logprobs), so (G, Lc, V) float32 logits never exist. pi_old, pi_ref and
pi take this same path. --update plain runs G rows [prompt; c_i] instead (the video still encoded once),
the same numbers at ~G times the prompt's cost; --update-chunk k splits a group into forwards of k.
Rollout, loss forward and eval all build their inputs with `data.build_inputs` (real `second_per_grid_ts`).
Known cost at scale: under ZeRO-3 HF `generate` gathers each layer's weights for every new token;
--gather-for-rollout gathers them once per rollout instead, with the ZeRO-3 hooks off while it runs
(needs the full bf16 weights per GPU: 15.4 GiB for the 7B).

Outputs in --out: checkpoint-STEP/ (HF weights + resume state), model/ (final HF weights),
metrics.jsonl (one line per step), rollouts.jsonl (a few sampled answers per step), curves.png.
On several nodes --out must be a directory every node shares (NFS, Lustre...): rank 0 writes the
checkpoints and every rank reads them on resume. Each run checks it at start and stops every rank
with a message naming the node that does not see it (model.check_shared_dir).

A video that does not decode mid-run (found before training by `prepare.py check`, so rare: a disk
error) stops every rank at once, with the sample named, before the step's first collective, so no
rank waits for a NCCL timeout; with --skip-bad its prompt is replaced by the next sample whose video
decodes (deterministic, so a resumed run does the same), logged and counted (`skipped_videos`).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

import data
from model import (check_shared_dir, completion_logprobs, dist_env, ds_config, freeze_vision, generate_from_prefixes,
                   generate_shared, init_distributed, keep_steps_upto, latest_checkpoint, load_checkpoint,
                   load_for_training, load_processor, optimizer_step, print0, prompt_inputs, save_checkpoint, save_hf,
                   suppress_ids, to_device, use_prefix_attention)
import reward

# -----------------------------------------------------------------------------
# The math: small pure functions (tests/test_grpo.py checks them on hand-computed cases)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages (r - mean) / (std + eps) within each group of G.
    Equal rewards give 0 (never NaN), and so does a group of a single sample."""
    rewards = rewards.double()
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True)  # unbiased; 0 for equal rewards -> (0) / (0 + eps) = 0
    return (rewards - mean) / (std + eps)


def guided_advantages(adv: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
    """TaRO: (P, G) advantages and a (P, G) bool mask of guided rollouts (continued from a caption
    prefix, data.guided_prefix) -> the advantages with max(A, 0) for the guided ones. A guided rollout
    is off-policy: it may pull the policy toward a good answer it was led to, never push it away from a
    bad one it did not choose (TaRO's off_policy_mode=mask). The group's mean and std, taken before
    this, include the guided rollouts, as in TaRO."""
    return torch.where(guided, adv.clamp(min=0), adv)


def guided_probability(step: int, guided_steps: int, p0: float = 1.0) -> float:
    """TaRO's progressive curriculum: the probability that a rollout at `step` (1-based) is guided.
    Linear from p0 at step 1 to 0 at step `guided_steps`, 0 after; guided_steps = 0: never guided;
    guided_steps = 1: p0 at step 1 only (a one-step schedule has no room to decay).

    The method describes a smooth move from guided to autonomous rollouts. TaRO's released scripts run
    a hard switch instead: every rollout guided for the whole first epoch, none after
    (p = max(0, 1 - step / steps_per_epoch) exists behind `enable_linear_warmup`, left off)."""
    if guided_steps <= 0 or step > guided_steps:
        return 0.0
    if guided_steps == 1:
        return p0
    return p0 * min(1.0, (guided_steps - step) / (guided_steps - 1))


def completion_mask(ids: torch.Tensor, eos_ids, pad_id: int) -> torch.Tensor:
    """(B, L) generated ids -> (B, L) float mask: 1 up to and including the first EOS, 0 after it.
    `eos_ids` is one id or a list (Qwen2.5-VL-Instruct stops on <|im_end|> and <|endoftext|>).
    A response truncated without EOS keeps all its tokens, except padding (pad_id that is not an EOS)."""
    is_eos = torch.isin(ids, torch.as_tensor(eos_ids, device=ids.device).reshape(-1))
    before_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # the first EOS itself counts
    return (before_first_eos & ((ids != pad_id) | is_eos)).float()


def grpo_loss(logp, old_logp, adv, mask, clip_eps=0.2, clip_eps_high=None, ref_logp=None, beta=0.0,
              entropy=None, entropy_coef=0.0, n_tokens=None, guided=None):
    """The GRPO objective, negated, token-level: sum over masked tokens / n_tokens.

    logp, old_logp, ref_logp, entropy, mask: (B, T); adv: (B, 1) or (B, T). n_tokens is the number of
    completion tokens the mean is over (default: mask.sum(); the training loop passes the mini-batch's
    count so micro-batches and ranks add up to one token mean). guided: None, or a (B,) / (B, 1) bool
    mask of TaRO's guided rows, whose loss is -A * logp: no ratio and no clip (their prefix was not
    sampled from pi_old, so pi / pi_old is no importance weight for them); KL and entropy apply as to
    any row. Returns (loss, stats) with stats the masked means of clip fraction, ratio, kl, entropy
    and, with `guided`, the guided token fraction (plain floats, for logging)."""
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    n = mask.sum() if n_tokens is None else torch.as_tensor(n_tokens, dtype=logp.dtype)
    n = n.clamp(min=1)
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + hi) * adv)
    # tokens whose gradient the clip removes: ratio beyond the bound in the direction A pushes it
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + hi) & (adv > 0))
    if guided is not None:
        guided = guided.reshape(-1, 1).bool()  # (B, 1): a whole response is guided or not
        per_token = torch.where(guided, -adv * logp, per_token)
        clipped = clipped & ~guided
    m = mask.sum().clamp(min=1).item()
    avg = lambda x: (x.detach().float() * mask).sum().item() / m  # noqa: E731  masked mean, for the logs
    stats = {"clip_frac": avg(clipped), "ratio": avg(ratio)}
    if guided is not None:
        stats["guided_frac"] = avg(guided)
    if beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3: unbiased for KL(pi || ref) under samples of pi, always >= 0
        per_token = per_token + beta * kl
        stats["kl"] = avg(kl)
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
        stats["entropy"] = avg(entropy)
    return (per_token * mask).sum() / n, stats


# -----------------------------------------------------------------------------
# Records


@dataclass
class Rollout:
    """One sampled answer, scored."""
    sample_id: str
    prompt_idx: int  # index in this rank's prompts of the step
    completion_ids: list[int]  # up to and including the first EOS
    text: str
    reward: float
    parts: dict  # iou, format, span (reward.tvg_reward's parts); with TaRO also guided, drop, bonus


@dataclass
class Group:
    """The G rollouts of one prompt, as tensors for the update."""
    prompt: dict  # one prompt's model inputs, no padding: input_ids (1, Lp), mm_token_type_ids, video tensors
    ids: torch.Tensor  # (G, Lc) completion ids, padded
    mask: torch.Tensor  # (G, Lc) completion_mask
    adv: torch.Tensor  # (G,)
    keep: bool = True  # False: dropped by --drop-uniform-groups
    guided: torch.Tensor | None = None  # (G,) bool: TaRO's guided rollouts (their loss: -A log pi, no ratio)
    old_logp: torch.Tensor | None = None  # (G, Lc) pi_old; None when it equals the current policy
    ref_logp: torch.Tensor | None = None  # (G, Lc) only with beta > 0


@dataclass
class StepResult:
    rollouts: list[Rollout]
    stats: dict  # this rank's sums (rewards, tokens, clip fraction, ...), see the end of grpo_step
    times: dict  # seconds: rollout, reward, update


def tvg(sample: data.Sample, text: str, ids: list[int]) -> tuple[float, dict]:
    """The paper's reward, against the sample's ORIGINAL ground-truth spans."""
    return reward.tvg_reward(text, sample.spans, sample.duration)


def tvg_taro_iou(sample: data.Sample, text: str, ids: list[int]) -> tuple[float, dict]:
    """--iou-reward taro: 0.9 * TaRO's boundary-weighted IoU + 0.1 * format. parts["iou"] stays the
    plain IoU (the logs and the temporal-sensitivity bonus's IoU gate read it)."""
    r, parts = reward.tvg_reward(text, sample.spans, sample.duration)
    parts["iou_reward"] = reward.taro_iou_reward(parts["span"], sample.spans, sample.duration)
    return 0.9 * parts["iou_reward"] + 0.1 * parts["format"], parts


# -----------------------------------------------------------------------------
# Config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Examples: see the docstring of grpo.py.")
    # where
    p.add_argument("--model", required=True, metavar="DIR", help="start policy: an HF directory (the SFT model) or hub id")
    p.add_argument("--data", required=True, metavar="JSONL", help="RL prompts, Sample JSONL (rl.jsonl: original GT spans, durations)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (checkpoints, final model/, logs, curves.png)")
    # GRPO
    p.add_argument("--group-size", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--prompts-per-step", type=int, default=128, help="prompts per rollout batch (global, all ranks)")
    p.add_argument("--steps", type=int, default=600, help="training steps (rollout batches)")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (constant)")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient; 0 loads no reference model")
    p.add_argument("--clip-eps", type=float, default=0.2, help="clip range of the importance ratio: 1 - eps")
    p.add_argument("--clip-eps-high", type=float, default=None, help="upper clip 1 + this (default: --clip-eps)")
    p.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus coefficient (authors: 1e-3)")
    p.add_argument("--mu", type=int, default=1, help="passes (GRPO's mu) over each rollout batch")
    p.add_argument("--mini-batch", type=int, default=None, help="prompts (x G answers) per optimizer step, global; "
                   "default: --prompts-per-step (one optimizer step per pass)")
    p.add_argument("--drop-uniform-groups", action="store_true", help="leave groups of equal rewards out of the loss")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--freeze-vision", action="store_true", help="update the language model only (as sft.py)")
    # TaRO (seed 002): three parts on top of GRPO, each its own flag; --taro sets TaRO's defaults
    p.add_argument("--taro", action="store_true", help="TaRO: guided rollouts decaying over one epoch, the "
                   "temporal-sensitivity bonus (alpha 0.3, radius 3 s, IoU >= 0.7); see the docstring")
    p.add_argument("--guided-steps", type=int, default=None, help="steps over which the chance of a guided "
                   "rollout decays linearly from --guided-p0 to 0 (default: one epoch with --taro, else 0: none)")
    p.add_argument("--guided-p0", type=float, default=1.0, help="chance that a rollout is guided at step 1")
    p.add_argument("--tsr-alpha", type=float, default=None, help="temporal-sensitivity bonus (default: 0.3 with "
                   "--taro, else 0: not computed)")
    p.add_argument("--tsr-radius", type=float, default=3.0, help="seconds around each GT boundary whose frames are shuffled")
    p.add_argument("--tsr-iou-min", type=float, default=0.7, help="the bonus goes only to rollouts with IoU >= this")
    p.add_argument("--tsr-margin", type=float, default=0.0, help="the bonus needs a drop above the group's mean + this")
    p.add_argument("--iou-reward", choices=["iou", "taro"], default="iou", help="the reward's IoU term: plain IoU "
                   "(the paper's), or TaRO's IoU * (1 - |ds|/D) * (1 - |de|/D)")
    # rollouts
    p.add_argument("--max-new-tokens", type=int, default=2048, help="longest answer sampled")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (also used for log-probs)")
    p.add_argument("--gen-batch", type=int, default=0, help="prompts per generate call on a rank (0: all)")
    # video
    p.add_argument("--nframes", type=int, default=data.NFRAMES, help="frames sampled per video")
    p.add_argument("--max-pixels", type=int, default=data.MAX_PIXELS, help="max pixels per frame")
    p.add_argument("--min-pixels", type=int, default=data.MIN_PIXELS, help="min pixels per frame")
    p.add_argument("--cache-videos", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each decoded video in RAM across steps (uint8: nframes*H*W*3 bytes a video, ~19 MB "
                        "at the paper's setting, per rank; the paper preset turns it off)")
    # distributed and memory
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 (default: on a GPU)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the update")
    p.add_argument("--update", choices=["packed", "plain"], default="packed", help="training forward of a group: "
                   "packed, one row [prompt; c_1 ... c_G]; plain, G rows [prompt; c_i] (for comparison)")
    p.add_argument("--update-chunk", type=int, default=0, help="completions per training forward (the prompt "
                   "is repeated once per forward; gradients add up); 0: the whole group")
    p.add_argument("--gather-for-rollout", action="store_true", help="ZeRO-3: gather all weights once per rollout")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    # checkpoints and logs
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the last step)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="complete checkpoints kept on disk")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--log-rollouts", type=int, default=2, help="sampled answers per step written to rollouts.jsonl")
    p.add_argument("--skip-bad", action="store_true", help="replace a prompt whose video does not decode by the "
                   "next readable sample (logged and counted) instead of stopping every rank")
    p.add_argument("--max-bad-steps", type=int, default=10, help="stop after this many steps in a row with a NaN "
                   "or inf loss or gradient (each update is skipped, logged and counted)")
    p.add_argument("--inject-nan", type=lambda v: [int(x) for x in v.split(",")], default=[],
                   help=argparse.SUPPRESS)  # tests only: rank 0's loss is NaN at these steps (comma-separated)
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and of sampling (plus the rank)")
    p.add_argument("--track-weights", action="store_true", help="log how far the weights moved from --model each "
                   "step (keeps a copy of them; not under ZeRO-3, whose weights are partitioned)")
    p.add_argument("--dry-run", action="store_true", help="check the flags and the batch arithmetic for "
                   "--world-size ranks, print the DeepSpeed config, load nothing, exit")
    p.add_argument("--world-size", type=int, default=None, help="with --dry-run: the planned number of ranks")
    args = p.parse_args(argv)
    if args.update_chunk < 0:
        p.error("--update-chunk must be >= 0")
    if args.track_weights and args.zero_stage == 3:
        p.error("--track-weights needs whole weights on every rank: not with --zero-stage 3")
    if args.max_bad_steps < 1:
        p.error("--max-bad-steps must be >= 1")
    if args.tsr_alpha is None:
        args.tsr_alpha = 0.3 if args.taro else 0.0
    if args.guided_steps is None and not args.taro:
        args.guided_steps = 0  # with --taro, main() sets one epoch once it knows the data's size
    if not 0.0 <= args.guided_p0 <= 1.0 or args.tsr_alpha < 0 or args.tsr_radius <= 0:
        p.error("--guided-p0 must be in [0, 1], --tsr-alpha >= 0 and --tsr-radius > 0")
    return args


# -----------------------------------------------------------------------------
# Model forwards: per-token log-probs and TaRO's temporal drops (the plumbing: model.py)


def sequence_logprobs(model, prompt: dict, ids, mask, temperature: float, suppress=None, with_entropy=False,
                      forward=None, packed=True):
    """Per-token log-probs (G, Lc) of G completions of ONE prompt (and entropies, or None), 0 where
    `mask` is 0. packed: one forward over the row [prompt; c_1 ... c_G] (the docstring's layout);
    else G rows [prompt; c_i]. `suppress`: the ids generate never samples, removed here too so that pi
    is exactly the sampling distribution. `forward` runs the model (the DeepSpeed engine when
    training; default: the model). The plumbing is model.completion_logprobs."""
    return completion_logprobs(model, prompt, ids, mask, temperature, suppress, with_entropy, packed, forward)


def temporal_drops(policy, processor, sample, video, prompt, ids, mask, parts, logprobs, args, generator, vkw):
    """TaRO's temporal sensitivity of a group's G rollouts, by the policy as it is at rollout time (no
    reference model): d_i = the token mean, over rollout i's whole completion (a guided prefix
    included), of log pi(y_t | V) - log pi(y_t | V'), where V' is the video with the frames within
    --tsr-radius s of the (first) GT span's start shuffled among themselves, and likewise around its
    end (data.shuffle_boundary_frames). ONE V' per group, so the bonus's threshold (the group's mean d)
    compares drops measured on the same video; TaRO draws one per rollout. Two no-grad forwards of the
    group (V, and V' encoded once). Returns (log pi(y | V) (G, Lc): pi_old as well, the G drops)."""
    frames, meta = video
    shuffled = data.shuffle_boundary_frames(frames, data.frame_times(meta), sample.spans[0], args.tsr_radius, generator)
    perturbed = prompt_inputs(to_device(data.build_inputs(processor, [sample], [(shuffled, meta)], **vkw), ids.device), 0)
    with torch.no_grad():
        lp = torch.cat([logprobs(policy, prompt, ids[s], mask[s])[0] for s in parts])
        lp_v = torch.cat([logprobs(policy, perturbed, ids[s], mask[s])[0] for s in parts])
    return lp, (((lp - lp_v) * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()


def stop_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the checkpoint's EOS id(s) and the pad token. The real Qwen2.5-VL
    already stops on <|endoftext|> (its pad); without it a sampled pad would be attended to during
    generation but be indistinguishable from padding in the loss forward."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    return eos + [tokenizer.pad_token_id] * (tokenizer.pad_token_id not in eos)


def sampling_kwargs(model, tokenizer, temperature: float, max_new_tokens: int, synced_gpus: bool = False) -> dict:
    """`generate` settings of a rollout, set explicitly over the checkpoint's generation config (Qwen's
    has a 1.05 repetition penalty): plain sampling at `temperature`, vision tokens never sampled."""
    return dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
                max_new_tokens=max_new_tokens, suppress_tokens=suppress_ids(tokenizer),
                eos_token_id=stop_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                synced_gpus=synced_gpus)


# -----------------------------------------------------------------------------
# One GRPO step: rollout -> reward -> advantages -> update


def grpo_step(engine, ref, processor, samples: list[data.Sample], args, reward_fn=None, videos=None,
              step: int = 1) -> StepResult:
    """One rollout batch on this rank (`samples`: its prompts) and the updates on it. `videos`: the
    prompts' decoded videos (load_prompts); decoded here when None. `step` (1-based) sets TaRO's
    curriculum and seeds its draws. `reward_fn` defaults to the paper's reward (or --iou-reward's)."""
    import torch.distributed as dist
    policy, G, dev = engine.module, args.group_size, engine.device
    world = dist.get_world_size()
    tok = processor.tokenizer
    eos, never = stop_ids(policy, tok), suppress_ids(tok)
    gen_kwargs = sampling_kwargs(policy, tok, args.temperature, args.max_new_tokens, synced_gpus=world > 1)
    vkw = dict(nframes=args.nframes, max_pixels=args.max_pixels, min_pixels=args.min_pixels)
    reward_fn = reward_fn or (tvg_taro_iou if args.iou_reward == "taro" else tvg)
    rank = dist.get_rank()
    t0 = time.time()

    # TaRO's guided rollouts: each rollout is guided with probability p(step), drawn per rollout, so a
    # group may mix guided and free ones; a guided one continues from a prefix of the sample's dense
    # captions (data.guided_prefix). Seeded by (seed, step, rank): a resumed run draws the same.
    p_guided = guided_probability(step, args.guided_steps, args.guided_p0)
    draw = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1_009 + rank)
    prefixes = [[[] for _ in range(G)] for _ in samples]  # token ids of each rollout's given start
    for i, s in enumerate(samples):
        for g in range(G):
            if s.captions and torch.rand((), generator=draw) < p_guided:
                prefixes[i][g] = tok.encode(data.guided_prefix(s.query, s.captions, draw), add_special_tokens=False)

    # 1. Rollout: each video decoded once, encoded once, prompt prefilled once per group.
    policy.eval()  # also turns activation checkpointing off, which would disable the KV cache
    if videos is None:
        videos = [data.load_video(s, **vkw) for s in samples]
    gather = contextlib.nullcontext()
    if args.gather_for_rollout and args.zero_stage == 3:
        # Every weight gathered ONCE for the whole rollout, with ZeRO-3's module hooks off meanwhile and
        # back on after (DeepSpeed's own helper for this). A plain GatheredParameters is not enough: the
        # hooks still re-partition each layer right after it runs, so decoding would gather the weights
        # again for every new token (tests/test_gpu_paths.py counts the all-gathered bytes).
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
        gather = unwrap_model_for_generation(engine)
    prompts, completions = [], []
    with gather:
        chunk = args.gen_batch or len(samples)
        for a in range(0, len(samples), chunk):
            batch = to_device(data.build_inputs(processor, samples[a:a + chunk], videos[a:a + chunk], **vkw), dev)
            if p_guided == 0:  # the same on every rank, so every rank makes the same generate calls
                new = generate_shared(policy, batch, G, gen_kwargs).cpu()
            else:
                new = generate_from_prefixes(policy, batch, G, [p for ps in prefixes[a:a + chunk] for p in ps],
                                             gen_kwargs, tok.pad_token_id, args.max_new_tokens).cpu()
            for j in range(len(samples[a:a + chunk])):
                prompts.append(prompt_inputs(batch, j))
                completions.append(new[j * G:(j + 1) * G])
    t1 = time.time()

    # 2. Reward, against the original ground truth; TaRO's bonus; advantages within each group.
    mini = (args.mini_batch or args.prompts_per_step) // world  # prompts per optimizer step on this rank
    off_policy = args.mu > 1 or mini < len(samples)
    parts = [slice(a, a + (args.update_chunk or G)) for a in range(0, G, args.update_chunk or G)]
    logprobs = functools.partial(sequence_logprobs, temperature=args.temperature, suppress=never,
                                 packed=args.update == "packed")
    rollouts, groups, signal = [], [], {"uniform": 0, "spread": 0.0, "distinct": 0}
    for i, (s, ids) in enumerate(zip(samples, completions)):
        mask = completion_mask(ids, eos, tok.pad_token_id)
        length = int(mask.sum(1).max())  # trim the batch's padding to this group's longest answer
        ids, mask = ids[:, :length].to(dev), mask[:, :length].to(dev)
        rs, group = [], []
        for g in range(G):
            kept = ids[g, :int(mask[g].sum())].tolist()
            text = tok.decode(kept, skip_special_tokens=True)
            r, info = reward_fn(s, text, kept)
            rs.append(r)
            group.append(Rollout(s.id, i, kept, text, r, dict(info, guided=bool(prefixes[i][g]))))
        old = None
        if args.tsr_alpha > 0:  # every group, on every rank: ZeRO-3 forwards are collective
            old, drops = temporal_drops(policy, processor, s, videos[i], prompts[i], ids, mask, parts, logprobs,
                                        args, torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1_009
                                                                            + rank * 101 + i), vkw)
            bonus = reward.temporal_sensitivity_bonus(drops, [x.parts["iou"] for x in group], args.tsr_alpha,
                                                      args.tsr_iou_min, args.tsr_margin)
            for x, d, b in zip(group, drops, bonus):
                x.reward += b
                x.parts.update(drop=d, bonus=b)
            rs = [x.reward for x in group]
        rollouts += group
        # How much learning signal the group holds: equal rewards give every answer A = 0.
        signal["uniform"] += max(rs) == min(rs)
        signal["spread"] += float(torch.tensor(rs).std()) if G > 1 else 0.0
        signal["distinct"] += len({x.text for x in group})
        guided = torch.tensor([bool(p) for p in prefixes[i]], device=dev)
        adv = guided_advantages(group_advantages(torch.tensor([rs]))[0].float().to(dev), guided)
        groups.append(Group(prompts[i], ids, mask, adv, keep=not (args.drop_uniform_groups and max(rs) == min(rs)),
                            guided=guided, old_logp=old if off_policy else None))
    t2 = time.time()

    # 3. pi_old (and pi_ref) log-probs, once, before any update -- only when they are needed (pi_old comes
    #    with TaRO's drops when those are computed). Dropped groups too: under ZeRO-3 every rank must run
    #    the same number of forwards. They take the update's forwards (same completions per forward), so
    #    pi / pi_old starts at exactly 1.
    with torch.no_grad():
        for g in groups:
            if off_policy and g.old_logp is None:
                g.old_logp = torch.cat([logprobs(policy, g.prompt, g.ids[s], g.mask[s])[0] for s in parts])
            if ref is not None:
                g.ref_logp = torch.cat([logprobs(ref, g.prompt, g.ids[s], g.mask[s])[0] for s in parts])

    # 4. Update: token mean over each mini-batch (all ranks); one forward/backward per group (or per
    #    --update-chunk completions of it: the gradients add up).
    policy.train()
    sums = {"tokens": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0, "loss": 0.0, "opt_steps": 0, "gnorm": 0.0,
            "bad_steps": 0}  # opt_steps: the updates applied; bad_steps: the ones skipped for a NaN or inf
    for _ in range(args.mu):
        for a in range(0, len(groups), mini):
            part = groups[a:a + mini]
            kept = [g for g in part if g.keep]
            counts = torch.tensor([sum(float(g.mask.sum()) for g in kept), len(kept)], dtype=torch.float64, device=dev)
            n_tokens = counts[:1].clone()
            dist.all_reduce(n_tokens)
            dist.all_reduce(counts[1:], op=dist.ReduceOp.MAX)
            n_micro = int(counts[1])
            if n_micro == 0:  # every group of this mini-batch dropped, on every rank
                continue
            loss_finite = True
            for k in range(n_micro):
                # ZeRO-3 needs the same number of forward/backward on every rank: a rank with fewer
                # kept groups repeats one with weight 0.
                g, w = (kept[k], 1.0) if k < len(kept) else ((kept or part)[0], 0.0)
                for j, s in enumerate(parts):
                    engine.set_gradient_accumulation_boundary(k == n_micro - 1 and j == len(parts) - 1)
                    logp, ent = logprobs(policy, g.prompt, g.ids[s], g.mask[s], with_entropy=args.entropy_coef > 0,
                                         forward=engine)
                    old = g.old_logp[s] if g.old_logp is not None else logp.detach()
                    ref_logp = g.ref_logp[s] if g.ref_logp is not None else None
                    # DeepSpeed averages gradients over ranks: dividing by n_tokens / world makes the sum a
                    # token mean over the whole mini-batch.
                    loss, st = grpo_loss(logp, old, g.adv[s, None], g.mask[s], args.clip_eps, args.clip_eps_high,
                                         ref_logp, args.beta, ent, args.entropy_coef, n_tokens=float(n_tokens) / world,
                                         guided=g.guided[s] if g.guided.any() else None)
                    if step in args.inject_nan and dist.get_rank() == 0:  # tests only: a bad step on one rank
                        loss = loss * float("nan")
                    loss_finite = loss_finite and math.isfinite(loss.item())
                    engine.backward(loss * w, scale_wrt_gas=False)
                    t = float(g.mask[s].sum()) * w
                    sums["tokens"] += t
                    sums["loss"] += loss.item() * w * float(n_tokens) / world
                    for key in ("clip_frac", "kl", "entropy"):
                        sums[key] += st.get(key, 0.0) * t
            gnorm, grads = None, [p.grad for p in policy.parameters() if p.grad is not None]
            if args.zero_stage == 0 and grads:  # DeepSpeed reports the norm only for ZeRO; grads are whole here
                gnorm = torch.stack([x.norm() for x in grads]).norm().item()
            # The update, unless a loss or gradient is NaN or inf on any rank: then every rank skips it and
            # drops its gradients (model.optimizer_step); main() counts the steps that had one.
            if optimizer_step(engine, loss_finite):
                sums["opt_steps"] += 1
                sums["gnorm"] += float(engine.get_global_grad_norm() if gnorm is None else gnorm)
            else:
                sums["bad_steps"] += 1
    # This rank's sums for the log line (the caller adds them up over ranks).
    r = [x.reward for x in rollouts]
    stats = dict(sums, n=len(rollouts), reward=sum(r), reward_sq=sum(x * x for x in r),
                 iou=sum(x.parts.get("iou", 0.0) for x in rollouts),
                 format=sum(x.parts.get("format", 0.0) for x in rollouts),
                 length=float(sum(len(x.completion_ids) for x in rollouts)), groups=len(groups),
                 dropped=sum(not g.keep for g in groups), guided=sum(x.parts["guided"] for x in rollouts), **signal,
                 bonus=sum(x.parts.get("bonus", 0.0) > 0 for x in rollouts),
                 tsr_drop=sum(x.parts.get("drop", 0.0) for x in rollouts if math.isfinite(x.parts.get("drop", 0.0))))
    return StepResult(rollouts, stats, {"rollout": t1 - t0, "reward": t2 - t1, "update": time.time() - t2})


# -----------------------------------------------------------------------------
# Setup: the policy engine, the reference model (only with beta > 0), the data order


def load_reference(args, cfg: dict, dtype, device):
    """The frozen pi_ref for beta > 0, loaded like the policy (partitioned under ZeRO-3). Never called
    with beta = 0: then no reference model exists (tests/test_grpo.py checks the run says so)."""
    ref, keep = load_for_training(args.model, cfg, dtype)
    ref.requires_grad_(False)
    use_prefix_attention(ref)
    if args.zero_stage == 3:  # an inference engine: weights stay partitioned, gathered per layer
        import deepspeed
        ref = deepspeed.initialize(model=ref, config={k: v for k, v in cfg.items() if k != "optimizer"})[0].module
    else:
        ref.to(device)
    return ref.eval(), keep


def setup(args):
    """-> (engine, ref or None, processor, keepalive). Call once per process."""
    import deepspeed
    device = init_distributed()
    rank, world, _ = dist_env()
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # ranks sample different answers
    bf16 = torch.cuda.is_available() if args.bf16 is None else args.bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    mini = (args.mini_batch or args.prompts_per_step) // world
    # DeepSpeed's micro-batch is one group (a prompt and its G answers); the script sets the
    # accumulation boundary itself, since --drop-uniform-groups makes the count vary.
    # small_model on the CPU: a tiny model is otherwise not partitioned at all by ZeRO-3.
    cfg = ds_config(micro_batch=1, grad_accum=mini, zero_stage=args.zero_stage, lr=args.lr, bf16=bf16,
                      grad_clip=args.grad_clip, weight_decay=args.weight_decay, small_model=device.type == "cpu")
    policy, keep = load_for_training(args.model, cfg, dtype)
    if args.freeze_vision:
        print0(f"vision tower frozen: {freeze_vision(policy):,} parameters not trained")
    if args.grad_ckpt:
        policy.activation_checkpointing_enable()
    use_prefix_attention(policy)  # SDPA as before, and the packed row's two-call attention (model.py)
    engine, *_ = deepspeed.initialize(model=policy, config=cfg,
                                      model_parameters=[p for p in policy.parameters() if p.requires_grad])
    ref = None
    if args.beta > 0:
        ref, keep_ref = load_reference(args, cfg, dtype, device)
        keep = (keep, keep_ref)
    return engine, ref, load_processor(args.model), keep


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return random.Random(seed * 100003 + epoch).sample(range(n), n)


def step_prompts(samples: list, step: int, args, rank: int, world: int) -> list:
    """This rank's prompts for `step` (1-based): epochs of seeded permutations consumed in order, so
    the data position is a function of the step alone and resuming needs nothing else."""
    n, per = len(samples), args.prompts_per_step // world
    first = (step - 1) * args.prompts_per_step + rank * per
    return [samples[_epoch_order(n, args.seed, k // n)[k % n]] for k in range(first, first + per)]


def load_prompts(samples: list, position: dict, step: int, args, rank: int, world: int, bad: dict,
                 cache: dict | None = None) -> tuple:
    """(prompts, their decoded videos, how many were replaced) of this rank for `step`. A video that does not decode is
    recorded in `bad` (id -> reason); with --skip-bad its prompt is replaced by the next sample of the
    file whose video decodes (deterministic: a resumed run replays the same replacement). Every rank so
    keeps its number of prompts, and no collective waits for a rank that failed; without --skip-bad
    main() stops every rank at once. `position`: sample id -> index in `samples`; `cache`: decoded videos
    kept across steps (--cache-videos, data.load_video_cached)."""
    vkw = dict(nframes=args.nframes, max_pixels=args.max_pixels, min_pixels=args.min_pixels)
    prompts, videos, replaced = [], [], 0
    for s in step_prompts(samples, step, args, rank, world):
        for j in range(len(samples)):
            cand = samples[(position[s.id] + j) % len(samples)]
            if cand.id in bad:
                continue
            try:
                videos.append(data.load_video_cached(cand, cache, **vkw))
                prompts.append(cand)
                replaced += cand is not s
                break
            except data.DataError as e:
                bad[cand.id] = str(e)
                if not args.skip_bad:
                    return prompts, videos, replaced
        else:
            raise data.DataError(f"{args.data}: no sample with a readable video left")
    return prompts, videos, replaced


# -----------------------------------------------------------------------------
# Logs


def _append(path: str, records: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def plot_curves(metrics_path: str, png: str) -> None:
    """Mean reward and response length against step, like the paper's Fig. 2."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_path) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    steps = [r["step"] for r in recs]
    taro = bool(recs) and "guided" in recs[0]
    fig, axes = plt.subplots(1, 3 if taro else 2, figsize=(15 if taro else 10, 3.6))
    a, b = axes[0], axes[1]
    a.plot(steps, [r["reward"] for r in recs])
    a.set(xlabel="step", ylabel="mean reward", title="reward (0.9 IoU + 0.1 format" + (" + bonus)" if taro else ")"))
    b.plot(steps, [r["length"] for r in recs], color="tab:orange")
    b.set(xlabel="step", ylabel="tokens", title="response length")
    if taro:  # TaRO's curriculum and temporal-sensitivity bonus
        c = axes[2]
        c.plot(steps, [r["guided"] for r in recs], label="guided fraction")
        c.plot(steps, [r["bonus_rate"] for r in recs], label="bonus rate")
        c.plot(steps, [r["tsr_drop"] for r in recs], label="mean drop d (nats/token)")
        c.set(xlabel="step", title="TaRO")
        c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def step_record(step: int, tot: dict, res: StepResult, sec: float, args) -> dict:
    """The step's metrics over all ranks (tot: summed stats)."""
    n, tokens = max(tot["n"], 1), max(tot["tokens"], 1)
    mean = tot["reward"] / n
    rec = {"step": step, "reward": mean, "reward_std": max(tot["reward_sq"] / n - mean ** 2, 0.0) ** 0.5,
           "iou": tot["iou"] / n, "format": tot["format"] / n, "length": tot["length"] / n,
           "loss": tot["loss"] / tokens, "clip_frac": tot["clip_frac"] / tokens,
           "grad_norm": res.stats["gnorm"] / res.stats["opt_steps"] if res.stats["opt_steps"] else None,
           "drop": tot["dropped"] / max(tot["groups"], 1), "opt_steps": res.stats["opt_steps"], "sec": sec,
           "skipped_videos": int(tot.get("skipped", 0)),
           # the learning signal: groups whose G rewards are all equal (A = 0 for each), the mean
           # within-group reward std, and how many different answers a group holds
           "uniform_groups": tot["uniform"] / max(tot["groups"], 1), "group_reward_std": tot["spread"] / max(tot["groups"], 1),
           "distinct_answers": tot["distinct"] / max(tot["groups"], 1),
           **{f"{k}_s": v for k, v in res.times.items()}}
    if args.beta > 0:
        rec["kl"] = tot["kl"] / tokens
    if args.entropy_coef > 0:
        rec["entropy"] = tot["entropy"] / tokens
    if args.taro or args.guided_steps or args.tsr_alpha > 0:  # TaRO: the share of guided rollouts, of bonuses, mean d
        rec.update(guided=tot["guided"] / n, bonus_rate=tot["bonus"] / n, tsr_drop=tot["tsr_drop"] / n)
    return rec


def log_line(rec: dict, steps: int, eta_s: float) -> str:
    g = "-" if rec["grad_norm"] is None else f"{rec['grad_norm']:.3g}"
    kl = f" | kl {rec['kl']:.3g}" if "kl" in rec else ""
    return (f"step {rec['step']}/{steps} | reward {rec['reward']:.3f}±{rec['reward_std']:.3f} | "
            f"iou {rec['iou']:.3f} | fmt {rec['format']:.2f} | len {rec['length']:.1f} | "
            f"clip {rec['clip_frac']:.3f}{kl} | gnorm {g} | drop {rec['drop']:.2f} | uniform {rec['uniform_groups']:.2f} | "
            f"{rec['sec']:.1f} s "
            f"(roll {rec['rollout_s']:.1f} rew {rec['reward_s']:.1f} upd {rec['update_s']:.1f}) | "
            f"ETA {datetime.timedelta(seconds=round(eta_s))}"
            + (f" | skipped videos {rec['skipped_videos']}" if rec.get("skipped_videos") else "")
            + (f" | guided {rec['guided']:.2f} bonus {rec['bonus_rate']:.2f} d {rec['tsr_drop']:.3f}" if "guided" in rec else ""))


# -----------------------------------------------------------------------------
# The loop


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, _ = dist_env()
    if args.dry_run:
        world = args.world_size or world
    P, G = args.prompts_per_step, args.group_size
    mini = args.mini_batch or P
    for ok, msg in [(P % world == 0, f"--prompts-per-step {P} must be a multiple of the world size {world}"),
                    (P % mini == 0, f"--mini-batch {mini} must divide --prompts-per-step {P}"),
                    (mini % world == 0, f"--mini-batch {mini} must be a multiple of the world size {world}"),
                    (G >= 1 and args.mu >= 1 and args.steps >= 1, "--group-size, --mu and --steps must be >= 1")]:
        if not ok:
            sys.exit(f"error: {msg}")
    if args.dry_run:  # what `bash run.sh paper --dry-run` checks without GPUs
        cfg = ds_config(micro_batch=1, grad_accum=mini // world, zero_stage=args.zero_stage, lr=args.lr,
                        bf16=bool(args.bf16), grad_clip=args.grad_clip, weight_decay=args.weight_decay, world=world)
        print(f"grpo.py dry run: {P} prompts x G={G} = {P * G} answers per step over {world} ranks "
              f"({P // world} prompts, {P // world * G} answers per rank); {P // mini} optimizer step(s) per "
              f"rollout x mu={args.mu}; DeepSpeed config:\n{json.dumps(cfg)}")
        return
    out = args.out
    last = latest_checkpoint(out)
    if last and os.path.isfile(os.path.join(out, "model", "config.json")):
        with open(os.path.join(last, "trainer_state.json")) as f:
            if json.load(f)["step"] >= args.steps:
                print0(f"{out} is a finished run ({args.steps} steps, final weights in {out}/model): nothing to do")
                return
    if last and not args.resume:
        sys.exit(f"error: {out} already has checkpoints ({last}); pass --resume to continue it, or choose a new --out")
    samples = data.read_jsonl(args.data)  # a malformed line stops here with file:line
    if not samples:
        sys.exit(f"error: {args.data} has no samples")
    no_duration = [s for s in samples if s.duration is None]
    if no_duration:  # the reward clamps spans to the video (and TaRO's IoU divides by its length)
        sys.exit(f"error: {len(no_duration)} of {len(samples)} samples of {args.data} have no duration, e.g. "
                 f"{no_duration[0].id}: give every sample its duration in seconds (data.py convert measures "
                 "it from the video when the file is there)")
    if args.guided_steps is None:  # --taro: the chance of guidance decays to 0 over one epoch of the RL set
        args.guided_steps = math.ceil(len(samples) / P)
    if args.guided_steps and not any(s.captions for s in samples):
        sys.exit(f"error: guided rollouts (--taro, --guided-steps) continue from dense captions, and no sample of "
                 f"{args.data} has `captions`; pass --guided-steps 0 to train without them")
    missing = [s for s in samples if not os.path.isfile(s.video)]
    if missing and not args.skip_bad:  # found now rather than at some step hours in
        sys.exit(f"error: {len(missing)} of {len(samples)} videos of {args.data} not found, e.g. sample "
                 f"{missing[0].id}: {missing[0].video} (--skip-bad replaces such prompts)")
    if missing:
        print0(f"{len(missing)} of {len(samples)} videos of {args.data} not found: their prompts will be replaced (--skip-bad)")

    engine, ref, processor, _keep = setup(args)
    import torch.distributed as dist
    check_shared_dir(out, engine.device)  # rank 0 writes the checkpoints every rank resumes from
    start, bad_in_a_row = 0, 0  # bad_in_a_row: the last steps with a NaN or inf update skipped, one after another
    if args.resume and last:
        state = load_checkpoint(engine, last)
        bad_in_a_row = state.get("bad_in_a_row", 0)
        for k in ("group_size", "prompts_per_step", "seed"):  # they define the data position and the run
            if state["args"][k] != getattr(args, k):
                sys.exit(f"error: --{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's "
                         f"{state['args'][k]} ({last})")
        start = state["step"]
        print0(f"resumed from {last}: continuing at step {start + 1}")
    metrics, rollouts_path = os.path.join(out, "metrics.jsonl"), os.path.join(out, "rollouts.jsonl")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:  # the resolved config (also in every checkpoint)
            json.dump({"args": vars(args), "deepspeed": engine.config, "world": world}, f, indent=1)
        for path in (metrics, rollouts_path):
            if start == 0 and os.path.exists(path):
                os.remove(path)
            keep_steps_upto(path, start)
    opt_steps = args.mu * (P // mini)
    print0(f"GRPO: {world} rank(s) x {P // world} prompts x G={G} = {P * G} answers per step, {opt_steps} optimizer "
             f"step(s) per rollout batch ({mini} prompts each, mu={args.mu}); {args.steps} steps over {len(samples)} "
             f"prompts; lr {args.lr}, beta {args.beta}, ZeRO-{args.zero_stage}; "
             + ("reference model loaded (beta > 0)" if ref is not None else "no reference model (beta = 0)"))

    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=start, desc="GRPO", unit="step", disable=rank != 0)
    times = []
    position, bad = {s.id: k for k, s in enumerate(samples)}, {}
    cache = {} if args.cache_videos else None  # each epoch revisits every prompt's video
    # --track-weights: how far the trained weights have moved from --model (a copy of them is kept)
    trained = [q for q in engine.module.parameters() if q.requires_grad]
    start_weights = [q.detach().clone() for q in trained] if args.track_weights else None
    for step in range(start + 1, args.steps + 1):
        t = time.time()
        n_bad = len(bad)
        prompts, videos, replaced = load_prompts(samples, position, step, args, rank, world, bad, cache)
        for i in list(bad)[n_bad:]:
            tqdm.write(f"[rank {rank}] step {step}: sample {i}: {bad[i]}" + (" (skipped: --skip-bad)" if args.skip_bad else ""))
        # Every rank learns of a bad video before the step's first collective: one rank stopping alone
        # would leave the others waiting in a collective until the NCCL timeout.
        flag = torch.tensor([len(bad) - n_bad], dtype=torch.float64, device=engine.device)
        dist.all_reduce(flag)
        if flag.item() and not args.skip_bad:
            print0(f"error: a video of {args.data} does not decode (named above); fix it, run `prepare.py check`, "
                   "or pass --skip-bad to replace such prompts")
            dist.destroy_process_group()
            sys.exit(1)
        res = grpo_step(engine, ref, processor, prompts, args, videos=videos, step=step)
        res.stats["skipped"] = replaced  # prompts whose video did not decode, replaced this step
        keys = ["n", "reward", "reward_sq", "iou", "format", "length", "tokens", "loss", "clip_frac", "kl",
                "entropy", "groups", "dropped", "skipped", "guided", "bonus", "tsr_drop", "uniform", "spread",
                "distinct"]
        tot = torch.tensor([float(res.stats[k]) for k in keys], dtype=torch.float64, device=engine.device)
        dist.all_reduce(tot)
        times.append(time.time() - t)
        rec = step_record(step, dict(zip(keys, tot.tolist())), res, times[-1], args)
        if start_weights is not None:  # relative distance ||w - w0|| / ||w0|| over the trained weights
            rec["weight_shift"] = (sum(float((q.detach() - q0).pow(2).sum()) for q, q0 in zip(trained, start_weights))
                                   / max(sum(float(q0.pow(2).sum()) for q0 in start_weights), 1e-30)) ** 0.5
        rec["bad_steps"] = res.stats["bad_steps"]  # updates skipped for a NaN or inf (decided by all ranks together)
        bad_in_a_row = bad_in_a_row + 1 if rec["bad_steps"] else 0
        if rank == 0:
            _append(metrics, [rec])
            _append(rollouts_path, [{"step": step, "id": x.sample_id, "response": x.text, "span": x.parts.get("span"),
                                     "gt": prompts[x.prompt_idx].spans, "reward": x.reward,
                                     "iou": x.parts.get("iou"), "format": x.parts.get("format"),
                                     **{k: x.parts[k] for k in ("guided", "drop", "bonus") if k in x.parts}}
                                    for x in res.rollouts[:args.log_rollouts]])
            tqdm.write(log_line(rec, args.steps, sum(times) / len(times) * (args.steps - step))
                       + (f" | NaN/inf loss or gradient: update skipped ({bad_in_a_row} step(s) in a row)"
                          if rec["bad_steps"] else ""))
            sys.stdout.flush()  # for `| tee` and log files: a pipe is block-buffered
        bar.update(1)
        if bad_in_a_row >= args.max_bad_steps:
            print0(f"error: {bad_in_a_row} steps in a row (steps {step - bad_in_a_row + 1} to {step}) had a NaN or inf "
                   f"loss or gradient; each update was skipped, now the run stops (--max-bad-steps "
                   f"{args.max_bad_steps}). The weights are those before step {step - bad_in_a_row + 1}; the last "
                   f"checkpoint is {latest_checkpoint(out) or '(none)'}. Look at the learning rate and the rewards.",
                   file=sys.stderr)
            dist.destroy_process_group()
            sys.exit(1)
        if step % args.save_every == 0 or step == args.steps:
            ckpt = save_checkpoint(engine, processor, out, step, {"args": vars(args), "deepspeed": engine.config,
                                                                  "bad_in_a_row": bad_in_a_row},
                                   keep=args.keep_checkpoints)
            if rank == 0:
                tqdm.write(f"saved {ckpt}")
                sys.stdout.flush()
    bar.close()
    save_hf(engine, processor, os.path.join(out, "model"))
    if rank == 0:
        plot_curves(metrics, os.path.join(out, "curves.png"))
        print(f"done: {out}/model, {metrics}, {out}/curves.png", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    from model import CheckpointError
    try:
        main()
    except (data.DataError, CheckpointError) as e:  # bad input or a checkpoint that cannot be written: named
        sys.exit(f"error: {e}")
