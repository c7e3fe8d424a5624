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

What is shared across the G samples of a prompt (STACK.md, measured; `bench.py` times it): the video
is decoded and run through the vision encoder ONCE per prompt, the prompt is prefilled once and its KV
cache repeated G times for generation, and the training forward runs the prompt (video included) ONCE
per group, forward and backward, in one packed row (--update packed, the default; model.py builds it):

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
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

import data
from model import (check_shared_dir, completion_logprobs, dist_env, ds_config, freeze_vision, init_distributed,
                   keep_steps_upto, latest_checkpoint, load_checkpoint, load_for_training, load_processor, print0,
                   save_checkpoint, save_hf, suppress_ids, use_prefix_attention)
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
    parts: dict  # iou, format, span (reward.tvg_reward's parts)


@dataclass
class Group:
    """The G rollouts of one prompt, as tensors for the update."""
    prompt: dict  # one prompt's model inputs, no padding: input_ids (1, Lp), mm_token_type_ids, video tensors
    ids: torch.Tensor  # (G, Lc) completion ids, padded
    mask: torch.Tensor  # (G, Lc) completion_mask
    adv: torch.Tensor  # (G,)
    keep: bool = True  # False: dropped by --drop-uniform-groups
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
    # rollouts
    p.add_argument("--max-new-tokens", type=int, default=2048, help="longest answer sampled")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (also used for log-probs)")
    p.add_argument("--gen-batch", type=int, default=0, help="prompts per generate call on a rank (0: all)")
    # video
    p.add_argument("--nframes", type=int, default=data.NFRAMES, help="frames sampled per video")
    p.add_argument("--max-pixels", type=int, default=data.MAX_PIXELS, help="max pixels per frame")
    p.add_argument("--min-pixels", type=int, default=data.MIN_PIXELS, help="min pixels per frame")
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
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--log-rollouts", type=int, default=2, help="sampled answers per step written to rollouts.jsonl")
    p.add_argument("--skip-bad", action="store_true", help="replace a prompt whose video does not decode by the "
                   "next readable sample (logged and counted) instead of stopping every rank")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and of sampling (plus the rank)")
    p.add_argument("--dry-run", action="store_true", help="check the flags and the batch arithmetic for "
                   "--world-size ranks, print the DeepSpeed config, load nothing, exit")
    p.add_argument("--world-size", type=int, default=None, help="with --dry-run: the planned number of ranks")
    args = p.parse_args(argv)
    if args.update_chunk < 0:
        p.error("--update-chunk must be >= 0")
    return args


# -----------------------------------------------------------------------------
# Model forwards: the shared rollout and the per-token log-probs


def prompt_inputs(batch, i: int) -> dict:
    """Prompt i of a left-padded build_inputs batch, padding removed (one video per prompt)."""
    keep = batch["attention_mask"][i].bool()
    patches = batch["video_grid_thw"].prod(-1)  # rows of pixel_values_videos per video
    start = int(patches[:i].sum())
    return {"input_ids": batch["input_ids"][i, keep][None],
            "mm_token_type_ids": batch["mm_token_type_ids"][i, keep][None],
            "pixel_values_videos": batch["pixel_values_videos"][start:start + int(patches[i])],
            "video_grid_thw": batch["video_grid_thw"][i:i + 1],
            "second_per_grid_ts": batch["second_per_grid_ts"][i:i + 1]}


@torch.no_grad()
def generate_shared(model, batch, G: int, gen_kwargs: dict) -> torch.Tensor:
    """Sample G answers for each prompt of a left-padded batch: (P * G, Lc) new ids, grouped by prompt.
    The vision encoder and the prompt prefill run once per prompt; the KV cache is repeated G times."""
    out = model(**batch, use_cache=True, logits_to_keep=1)  # (P, ...) prefill, video encoded once
    cache = out.past_key_values
    cache.batch_repeat_interleave(G)
    cache.crop(-1)  # generate must see one uncached token to produce the first logits
    # Continuing from a cache, generate places new tokens at (token index + model.model.rope_deltas).
    # The prefill set rope_deltas (P, 1) from the prompt's real positions (model.get_rope_index: the
    # text resumes after the video's last position); the G copies of a prompt share it.
    model.model.rope_deltas = model.model.rope_deltas.repeat_interleave(G, 0)  # (P * G, 1)
    ids = batch["input_ids"].repeat_interleave(G, 0)
    seqs = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].repeat_interleave(G, 0),
                          past_key_values=cache, **gen_kwargs)
    return seqs[:, ids.shape[1]:]


def sequence_logprobs(model, prompt: dict, ids, mask, temperature: float, suppress=None, with_entropy=False,
                      forward=None, packed=True):
    """Per-token log-probs (G, Lc) of G completions of ONE prompt (and entropies, or None), 0 where
    `mask` is 0. packed: one forward over the row [prompt; c_1 ... c_G] (the docstring's layout);
    else G rows [prompt; c_i]. `suppress`: the ids generate never samples, removed here too so that pi
    is exactly the sampling distribution. `forward` runs the model (the DeepSpeed engine when
    training; default: the model). The plumbing is model.completion_logprobs."""
    return completion_logprobs(model, prompt, ids, mask, temperature, suppress, with_entropy, packed, forward)


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


def _to(d: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in d.items()}


# -----------------------------------------------------------------------------
# One GRPO step: rollout -> reward -> advantages -> update


def grpo_step(engine, ref, processor, samples: list[data.Sample], args, reward_fn=tvg, videos=None) -> StepResult:
    """One rollout batch on this rank (`samples`: its prompts) and the updates on it. `videos`: the
    prompts' decoded videos (load_prompts); decoded here when None."""
    import torch.distributed as dist
    policy, G, dev = engine.module, args.group_size, engine.device
    world = dist.get_world_size()
    tok = processor.tokenizer
    eos, never = stop_ids(policy, tok), suppress_ids(tok)
    gen_kwargs = sampling_kwargs(policy, tok, args.temperature, args.max_new_tokens, synced_gpus=world > 1)
    vkw = dict(nframes=args.nframes, max_pixels=args.max_pixels, min_pixels=args.min_pixels)
    t0 = time.time()

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
        step = args.gen_batch or len(samples)
        for a in range(0, len(samples), step):
            batch = _to(data.build_inputs(processor, samples[a:a + step], videos[a:a + step], **vkw), dev)
            new = generate_shared(policy, batch, G, gen_kwargs).cpu()
            for j in range(len(samples[a:a + step])):
                prompts.append(prompt_inputs(batch, j))
                completions.append(new[j * G:(j + 1) * G])
    t1 = time.time()

    # 2. Reward, against the original ground truth.
    rollouts, groups = [], []
    for i, (s, ids) in enumerate(zip(samples, completions)):
        mask = completion_mask(ids, eos, tok.pad_token_id)
        rs = []
        for g in range(G):
            kept = ids[g, :int(mask[g].sum())].tolist()
            text = tok.decode(kept, skip_special_tokens=True)
            r, parts = reward_fn(s, text, kept)
            rs.append(r)
            rollouts.append(Rollout(s.id, i, kept, text, r, parts))
        length = int(mask.sum(1).max())  # trim the batch's padding to this group's longest answer
        adv = group_advantages(torch.tensor([rs]))[0].float()
        groups.append(Group(prompts[i], ids[:, :length].to(dev), mask[:, :length].to(dev), adv.to(dev),
                            keep=not (args.drop_uniform_groups and max(rs) == min(rs))))
    t2 = time.time()

    # 3. pi_old (and pi_ref) log-probs, once, before any update -- only when they are needed. Dropped
    #    groups too: under ZeRO-3 every rank must run the same number of forwards.
    #    They take the update's forwards (same completions per forward), so pi / pi_old starts at exactly 1.
    mini = (args.mini_batch or args.prompts_per_step) // world  # prompts per optimizer step on this rank
    off_policy = args.mu > 1 or mini < len(groups)
    parts = [slice(a, a + (args.update_chunk or G)) for a in range(0, G, args.update_chunk or G)]
    logprobs = functools.partial(sequence_logprobs, temperature=args.temperature, suppress=never,
                                 packed=args.update == "packed")
    with torch.no_grad():
        for g in groups:
            if off_policy:
                g.old_logp = torch.cat([logprobs(policy, g.prompt, g.ids[s], g.mask[s])[0] for s in parts])
            if ref is not None:
                g.ref_logp = torch.cat([logprobs(ref, g.prompt, g.ids[s], g.mask[s])[0] for s in parts])

    # 4. Update: token mean over each mini-batch (all ranks); one forward/backward per group (or per
    #    --update-chunk completions of it: the gradients add up).
    policy.train()
    sums = {"tokens": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0, "loss": 0.0, "opt_steps": 0, "gnorm": 0.0}
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
                                         ref_logp, args.beta, ent, args.entropy_coef, n_tokens=float(n_tokens) / world)
                    engine.backward(loss * w, scale_wrt_gas=False)
                    t = float(g.mask[s].sum()) * w
                    sums["tokens"] += t
                    sums["loss"] += loss.item() * w * float(n_tokens) / world
                    for key in ("clip_frac", "kl", "entropy"):
                        sums[key] += st.get(key, 0.0) * t
            gnorm, grads = None, [p.grad for p in policy.parameters() if p.grad is not None]
            if args.zero_stage == 0 and grads:  # DeepSpeed reports the norm only for ZeRO; grads are whole here
                gnorm = torch.stack([x.norm() for x in grads]).norm().item()
            engine.step()
            sums["opt_steps"] += 1
            sums["gnorm"] += float(engine.get_global_grad_norm() if gnorm is None else gnorm)
    # This rank's sums for the log line (the caller adds them up over ranks).
    r = [x.reward for x in rollouts]
    stats = dict(sums, n=len(rollouts), reward=sum(r), reward_sq=sum(x * x for x in r),
                 iou=sum(x.parts.get("iou", 0.0) for x in rollouts),
                 format=sum(x.parts.get("format", 0.0) for x in rollouts),
                 length=float(sum(len(x.completion_ids) for x in rollouts)), groups=len(groups),
                 dropped=sum(not g.keep for g in groups))
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


def load_prompts(samples: list, position: dict, step: int, args, rank: int, world: int, bad: dict) -> tuple:
    """(prompts, their decoded videos, how many were replaced) of this rank for `step`. A video that does not decode is
    recorded in `bad` (id -> reason); with --skip-bad its prompt is replaced by the next sample of the
    file whose video decodes (deterministic: a resumed run replays the same replacement). Every rank so
    keeps its number of prompts, and no collective waits for a rank that failed; without --skip-bad
    main() stops every rank at once. `position`: sample id -> index in `samples`."""
    vkw = dict(nframes=args.nframes, max_pixels=args.max_pixels, min_pixels=args.min_pixels)
    prompts, videos, replaced = [], [], 0
    for s in step_prompts(samples, step, args, rank, world):
        for j in range(len(samples)):
            cand = samples[(position[s.id] + j) % len(samples)]
            if cand.id in bad:
                continue
            try:
                videos.append(data.load_video(cand, **vkw))
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
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [r["reward"] for r in recs])
    a.set(xlabel="step", ylabel="mean reward", title="reward (0.9 IoU + 0.1 format)")
    b.plot(steps, [r["length"] for r in recs], color="tab:orange")
    b.set(xlabel="step", ylabel="tokens", title="response length")
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
           **{f"{k}_s": v for k, v in res.times.items()}}
    if args.beta > 0:
        rec["kl"] = tot["kl"] / tokens
    if args.entropy_coef > 0:
        rec["entropy"] = tot["entropy"] / tokens
    return rec


def log_line(rec: dict, steps: int, eta_s: float) -> str:
    g = "-" if rec["grad_norm"] is None else f"{rec['grad_norm']:.3g}"
    kl = f" | kl {rec['kl']:.3g}" if "kl" in rec else ""
    return (f"step {rec['step']}/{steps} | reward {rec['reward']:.3f}±{rec['reward_std']:.3f} | "
            f"iou {rec['iou']:.3f} | fmt {rec['format']:.2f} | len {rec['length']:.1f} | "
            f"clip {rec['clip_frac']:.3f}{kl} | gnorm {g} | drop {rec['drop']:.2f} | {rec['sec']:.1f} s "
            f"(roll {rec['rollout_s']:.1f} rew {rec['reward_s']:.1f} upd {rec['update_s']:.1f}) | "
            f"ETA {datetime.timedelta(seconds=round(eta_s))}"
            + (f" | skipped videos {rec['skipped_videos']}" if rec.get("skipped_videos") else ""))


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
    missing = [s for s in samples if not os.path.isfile(s.video)]
    if missing and not args.skip_bad:  # found now rather than at some step hours in
        sys.exit(f"error: {len(missing)} of {len(samples)} videos of {args.data} not found, e.g. sample "
                 f"{missing[0].id}: {missing[0].video} (--skip-bad replaces such prompts)")
    if missing:
        print0(f"{len(missing)} of {len(samples)} videos of {args.data} not found: their prompts will be replaced (--skip-bad)")

    engine, ref, processor, _keep = setup(args)
    import torch.distributed as dist
    check_shared_dir(out, engine.device)  # rank 0 writes the checkpoints every rank resumes from
    start = 0
    if args.resume and last:
        state = load_checkpoint(engine, last)
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
    for step in range(start + 1, args.steps + 1):
        t = time.time()
        n_bad = len(bad)
        prompts, videos, replaced = load_prompts(samples, position, step, args, rank, world, bad)
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
        res = grpo_step(engine, ref, processor, prompts, args, videos=videos)
        res.stats["skipped"] = replaced  # prompts whose video did not decode, replaced this step
        keys = ["n", "reward", "reward_sq", "iou", "format", "length", "tokens", "loss", "clip_frac", "kl",
                "entropy", "groups", "dropped", "skipped"]
        tot = torch.tensor([float(res.stats[k]) for k in keys], dtype=torch.float64, device=engine.device)
        dist.all_reduce(tot)
        times.append(time.time() - t)
        rec = step_record(step, dict(zip(keys, tot.tolist())), res, times[-1], args)
        if rank == 0:
            _append(metrics, [rec])
            _append(rollouts_path, [{"step": step, "id": x.sample_id, "response": x.text, "span": x.parts.get("span"),
                                     "gt": prompts[x.prompt_idx].spans, "reward": x.reward,
                                     "iou": x.parts.get("iou"), "format": x.parts.get("format")}
                                    for x in res.rollouts[:args.log_rollouts]])
            tqdm.write(log_line(rec, args.steps, sum(times) / len(times) * (args.steps - step)))
            sys.stdout.flush()  # for `| tee` and log files: a pipe is block-buffered
        bar.update(1)
        if step % args.save_every == 0 or step == args.steps:
            ckpt = save_checkpoint(engine, processor, out, step, {"args": vars(args), "deepspeed": engine.config})
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
    main()
