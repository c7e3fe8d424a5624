r"""Cold-start SFT: teach the model to answer in the format GRPO rewards, from the teacher's filtered CoT.

    # 1 CPU (the tiny preset; no launcher needed: the script makes a world of one)
    python sft.py --model runs/tiny/base_model --data runs/tiny/annotate/coldstart.jsonl --out runs/tiny/sft \
        --nframes 16 --max-pixels 3136 --min-pixels 3136 --lr 1e-3 --epochs 3
    # 2 CPU processes, ZeRO-3 (what the tests run)
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 sft.py ... --zero-stage 3
    # 1 GPU: full fine-tuning with AdamW keeps ~16 bytes/parameter of model states (~133 GB for the
    # 7B), so one 80 GB GPU takes the 3B (~60 GB) with activation checkpointing, not the 7B
    python sft.py --model Qwen/Qwen2.5-VL-3B-Instruct --data coldstart.jsonl --out runs/sft --grad-ckpt
    # the paper's SFT: 1 epoch, lr 1e-6, global batch 8 on ONE node of 8 GPUs
    torchrun --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --data coldstart.jsonl \
        --out runs/sft --zero-stage 3 --grad-ckpt
    # 2 nodes x 8 GPUs (hostfile lines: `node1 slots=8`, `node2 slots=8`; OUT on a shared filesystem).
    # A global batch of 8 cannot be split over 16 ranks: the batch must be a multiple of 16 here.
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 sft.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --data coldstart.jsonl --out runs/sft --zero-stage 3 --grad-ckpt --batch-size 16

Data: Sample JSONL (data.py) whose samples carry `cot`. The assistant target is
`data.format_answer(cot, answer)` = `<think>{cot}</think> <time>[s, e]</time>`, where `answer` is the
teacher's span stored with the sample; when a sample has no `answer`, its FIRST ground-truth span is
used instead. A sample without `cot`, with a reversed span or with a missing video stops the run with
its file:line and id (an unreadable video is found when first decoded, mid-run); `--skip-bad` skips
such samples and counts them (a video found unreadable mid-run is replaced by the next sample of the
epoch's order, so every rank still runs its forward: ZeRO-3 gathers are collective).

Loss: cross-entropy on the assistant answer and its closing <|im_end|> only (system prompt, query,
video tokens, the `<|im_start|>assistant` header and padding are masked). Logits are computed ONLY at
the positions that predict a labelled token (`logits_to_keep` as a boolean mask): for the 7B the
~4K-token prompt's logits would dominate memory. Averaging: token mean within each micro-batch, then
a plain mean over the micro-batches of a step (DeepSpeed divides by gradient-accumulation steps and
averages gradients over ranks). With the default micro-batch 1 that is a mean over samples of each
sample's token mean (long answers do not outweigh short ones).

Order: a seeded permutation per epoch (`--group-by-video`: of the videos, each video's queries
consecutive; see `epoch_order`); each global batch is `--batch-size` consecutive samples of it,
every rank takes its slice; an incomplete last batch of an epoch is dropped. `--max-steps` overrides
`--epochs` (the data repeats as needed). Schedule: linear warmup over `--warmup-ratio` of the steps,
then cosine to 0 (or constant, or linear to 0), set on the optimizer's param groups every step.

Outputs in OUT: `model/` (the final HF model: `--model OUT/model` for grpo.py and eval.py),
`checkpoint-STEP/` every `--save-every` steps and at the end (HF weights + DeepSpeed state + RNG +
trainer_state.json with the data position, written last: a checkpoint without it is incomplete and
never resumed from), `metrics.jsonl` (one line per step), `config.json` (resolved flags + DeepSpeed
config), `loss.png`. `--resume` continues from the latest complete checkpoint (and exits at once if
the run has finished); killed and resumed, a run ends with the weights of an uninterrupted one.
With `--freeze-vision` (and `--cache-videos`) the frozen vision tower's output for each video is kept
after its first encode: a micro-batch whose videos are all kept skips decoding them, the processor's
pixel work and the tower (the model takes the kept output through transformers' `mm_encoder_outputs`).
A step whose loss or gradient is NaN or inf on any rank is skipped by every rank (no update; logged as
`bad_step`, counted in `bad_steps`); `--max-bad-steps` in a row stop the run. A checkpoint that cannot be
written (a full disk) stops it with the checkpoint named; the last complete one is kept for --resume.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import MAX_PIXELS, MIN_PIXELS, NFRAMES, DataError, Sample, build_inputs, build_text_inputs, file_lines, \
    format_answer, json_line, load_video_cached, sample_from_dict
from model import (CheckpointError, check_shared_dir, dist_env, ds_config, freeze_vision, init_distributed,
                   keep_steps_upto, latest_checkpoint, load_checkpoint, load_for_training, load_processor,
                   optimizer_step, print0, save_checkpoint, save_hf)

IGNORE = -100  # label of a token that carries no loss (cross_entropy's ignore_index)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Cold-start SFT on the teacher's CoT (see the docstring for commands).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    # what to train, on what, where to
    p.add_argument("--model", required=True, help="base model: a local directory or a hub id")
    p.add_argument("--data", required=True, help="cold-start Sample JSONL (samples with `cot`)")
    p.add_argument("--out", required=True, help="output directory (model/, checkpoint-*/, metrics.jsonl)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad samples instead of stopping")
    # optimisation (paper: 1 epoch, lr 1e-6, global batch 8)
    p.add_argument("--epochs", type=int, default=1, help="passes over the data")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-6, help="peak learning rate")
    p.add_argument("--schedule", choices=["cosine", "constant", "linear"], default="cosine",
                   help="learning-rate decay after warmup (cosine and linear decay to 0)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="share of the steps with linear warmup")
    p.add_argument("--batch-size", type=int, default=8, help="GLOBAL batch (samples per optimizer step)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per forward on one rank")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-bad-steps", type=int, default=10, help="stop after this many steps in a row with a NaN "
                   "or inf loss or gradient (each is skipped: no update, logged and counted)")
    p.add_argument("--inject-nan", type=lambda v: [int(x) for x in v.split(",")], default=[],
                   help=argparse.SUPPRESS)  # tests only: rank 0's loss is NaN at these steps (comma-separated)
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and torch")
    p.add_argument("--group-by-video", action=argparse.BooleanOptionalAction, default=False,
                   help="order each epoch by video: the videos in a seeded order, each video's samples (its "
                        "queries) consecutive, so a batch holds every query of the videos it covers; the tiny "
                        "preset learns to read the query ~2x sooner (README)")
    p.add_argument("--freeze-vision", action="store_true", help="train the language model only: the vision "
                   "tower and its merger stay as loaded (the tiny preset's random ViT; see model.freeze_vision)")
    # video (paper: 64 frames of at most 128*28*28 pixels)
    p.add_argument("--nframes", type=int, default=NFRAMES, help="frames sampled per video")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="max pixels per frame")
    p.add_argument("--min-pixels", type=int, default=MIN_PIXELS, help="min pixels per frame")
    p.add_argument("--cache-videos", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each decoded video in RAM (uint8: nframes*H*W*3 bytes, ~19 MB at the paper's "
                        "setting, per rank); worth it when samples share videos or epochs repeat. With "
                        "--freeze-vision, keep the frozen tower's output per video instead (see VisionCache)")
    # memory, precision, distribution
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0, help="DeepSpeed ZeRO stage")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (non-reentrant)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights and compute (default: on with CUDA, fp32 on CPU)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="set by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment)")
    # checkpoints and logging
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: 4 per run)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="complete checkpoints kept on disk")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out "
                   "(a fresh start when there is none; exits at once when the run has finished)")
    p.add_argument("--dry-run", action="store_true", help="check the flags and the batch arithmetic for "
                   "--world-size ranks, print the DeepSpeed config, load nothing, exit")
    p.add_argument("--world-size", type=int, default=None, help="with --dry-run: the planned number of ranks")
    a = p.parse_args(argv)
    if a.max_bad_steps < 1:
        p.error("--max-bad-steps must be >= 1")
    if a.bf16 is None:
        a.bf16 = torch.cuda.is_available()
    return a


# -----------------------------------------------------------------------------
# Data: validated examples, epoch order, videos decoded once


@dataclass
class Example:
    sample: Sample
    where: str  # "coldstart.jsonl:12": named in every error about this sample
    target: str  # the assistant text: <think>{cot}</think> <time>[s, e]</time>


def parse_example(line: bytes, where: str, root: Path) -> Example:
    d = json_line(line, where)
    where = f"{where} (sample {d.get('id', '?') if isinstance(d, dict) else '?'})"
    s = sample_from_dict(d, where)  # spans and answer: numbers, finite, start <= end
    if not os.path.isabs(s.video):  # relative to the JSONL's directory, as data.read_jsonl does
        s.video = str((root / s.video).resolve())
    if not (s.cot and s.cot.strip()):
        raise DataError(f"{where}: no `cot` (the teacher's reasoning): nothing to train on")
    if not os.path.isfile(s.video):
        raise DataError(f"{where}: video not found: {s.video}")
    return Example(s, where, format_answer(s.cot, s.answer if s.answer is not None else s.spans[0]))


def read_coldstart(path: str, skip_bad: bool) -> tuple[list[Example], list[str]]:
    """All usable examples, and the error messages of the skipped ones (raises unless skip_bad). A line
    whose id an earlier line has is bad too: the data fingerprint and the logs name samples by id."""
    good, bad, seen = [], [], {}
    for where, line in file_lines(path):
        try:
            ex = parse_example(line, where, Path(path).resolve().parent)
            if ex.sample.id in seen:
                raise DataError(f"{ex.where}: duplicate sample id (first at {seen[ex.sample.id]})")
            seen[ex.sample.id] = ex.where
            good.append(ex)
        except DataError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
    if not good:
        raise DataError(f"{path}: no usable sample ({len(bad)} bad)")
    return good, bad


def epoch_order(n: int, seed: int, epoch: int, groups: list | None = None) -> list[int]:
    """The epoch's sample order: a seeded permutation of range(n). With `groups` (a key per sample, its
    video: --group-by-video) a seeded permutation of the groups, each group's samples consecutive, in a
    seeded order of their own: a batch then holds every query of the few videos it covers."""
    rng = np.random.default_rng([seed, epoch])
    if groups is None:
        return rng.permutation(n).tolist()
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = list(members)  # first-seen order: the file's, so the order depends on the data and seed only
    return [i for k in rng.permutation(len(keys)) for i in rng.permutation(members[keys[k]]).tolist()]


class VisionCache:
    """--freeze-vision: the vision tower never changes, so its output for a video is the same every epoch.
    It is kept per video (the merged tokens (n, hidden), the grid row, the seconds per temporal patch:
    16 KB a video in the tiny preset) from the forward that first encoded it (a hook on the tower, so
    nothing runs twice), and a micro-batch whose videos are all kept is built by `inputs` without
    pixels: no decoding, no processor pixel work, no tower. Kept outputs come from another batch than
    the one they are reused in, so they could differ from a fresh encode by float rounding (the batched
    matmuls' sums), not more: tests/test_sft.py compares training with and without the cache."""

    def __init__(self, model, processor):
        self.kept: dict = {}  # video path -> (tokens, grid (t, h, w), seconds per temporal patch)
        self.merge = processor.video_processor.merge_size ** 2  # patches per merged token
        self.captured: list = []
        self.hits = self.misses = 0
        model.model.visual.register_forward_hook(lambda mod, inp, out: self.captured.append(out.pooler_output.detach()))

    def agree(self, exs: list, device) -> bool:
        """True when every video of the micro-batch is kept on every rank: under ZeRO-3 the tower's
        weights are gathered by all ranks together, so they all run it or none does."""
        hit = all(e.sample.video in self.kept for e in exs)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            flag = torch.tensor([float(hit)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            hit = bool(flag.item())
        self.hits, self.misses = self.hits + hit, self.misses + (not hit)
        return hit

    def inputs(self, exs: list, processor, vkw: dict):
        """The micro-batch's inputs (right-padded, with answers) from the kept outputs."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        kept = [self.kept[e.sample.video] for e in exs]
        inputs = build_text_inputs(processor, [e.sample for e in exs], [g for _, g, _ in kept], [s for _, _, s in kept],
                                   answers=[e.target for e in exs], padding_side="right", **vkw)
        inputs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=tuple(t for t, _, _ in kept))}
        return inputs

    def keep(self, exs: list, inputs) -> None:
        """After a forward: keep what the tower output for each video of the micro-batch, if it ran."""
        if self.captured:
            sizes = (inputs["video_grid_thw"].prod(-1) // self.merge).tolist()
            for e, t, g, s in zip(exs, self.captured[-1].split(sizes), inputs["video_grid_thw"].tolist(),
                                  inputs["second_per_grid_ts"].tolist()):
                self.kept[e.sample.video] = (t, g, s)
        self.captured.clear()


# -----------------------------------------------------------------------------
# Labels and loss


def make_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B, T) labels: the token id on the assistant answer and its closing <|im_end|> (so the model
    learns to stop), IGNORE everywhere else. The answer starts after the LAST `<|im_start|>assistant\\n`
    of each row, which works for either padding side; a mismatch raises instead of training on garbage."""
    im_start, im_end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer.encode("assistant\n", add_special_tokens=False)
    labels = torch.full_like(input_ids, IGNORE)
    for b, row in enumerate(input_ids.tolist()):
        starts = [i for i, t in enumerate(row) if t == im_start]
        a = starts[-1] + 1 if starts else -1
        if a < 0 or row[a:a + len(header)] != header:
            raise ValueError(f"row {b}: no `<|im_start|>assistant` turn found in the input ids")
        a += len(header)
        if im_end not in row[a:]:
            raise ValueError(f"row {b}: the assistant answer has no closing <|im_end|>")
        e = row.index(im_end, a)
        labels[b, a:e + 1] = input_ids[b, a:e + 1]
    return labels


def sft_loss(model, batch: dict, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens of one micro-batch. Position t predicts token t+1,
    so logits are needed only where labels[:, t+1] is set: a boolean `logits_to_keep` makes the model
    apply lm_head there only and return (N, V) logits in row-major order."""
    keep = torch.zeros_like(labels, dtype=torch.bool)  # (B, T)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    logits = model(**batch, logits_to_keep=keep, use_cache=False).logits  # (N, V)
    return F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])  # targets (N,)


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak * (1 - progress)
    return peak


def count_params(path: str) -> int:
    """Parameter count from the config alone (meta device): decides the ZeRO-3 partitioning threshold."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(path)).parameters())


def plot_loss(metrics_path: str, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in open(metrics_path)]
    plt.figure(figsize=(6, 3.5))
    plt.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    plt.xlabel("step"), plt.ylabel("SFT loss (answer tokens)"), plt.grid(alpha=0.3), plt.tight_layout()
    plt.savefig(png, dpi=100)
    plt.close()


def fail(msg: str) -> None:
    """Stop every rank with the message printed once."""
    sys.exit(f"error: {msg}" if dist_env()[0] == 0 else 1)


# -----------------------------------------------------------------------------


def dry_run(args) -> None:
    """What `bash run.sh paper --dry-run` checks without GPUs: the flags parse, the global batch splits
    over the planned ranks, and the DeepSpeed config that follows."""
    world = args.world_size or dist_env()[1]
    if args.batch_size % (args.micro_batch * world):
        fail(f"--batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch} x {world} ranks")
    grad_accum = args.batch_size // (args.micro_batch * world)
    cfg = ds_config(args.micro_batch, grad_accum, args.zero_stage, args.lr, args.bf16, args.grad_clip,
                    args.weight_decay, world=world)
    print(f"sft.py dry run: global batch {args.batch_size} = micro-batch {args.micro_batch} x grad accumulation "
          f"{grad_accum} x {world} ranks; DeepSpeed config:\n{json.dumps(cfg)}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    rank, world, _ = dist_env()
    out = args.out

    # Data first: bad input stops the run before any model is loaded.
    try:
        examples, bad = read_coldstart(args.data, args.skip_bad)
    except (DataError, OSError) as e:
        fail(f"{e}\n(pass --skip-bad to skip bad samples)" if isinstance(e, DataError) else str(e))
    if bad:
        print0(f"skipping {len(bad)} bad sample(s) of {len(bad) + len(examples)} (--skip-bad), e.g.:\n  "
               + "\n  ".join(bad[:5]))
    n, batch = len(examples), args.batch_size
    if batch % (args.micro_batch * world):
        fail(f"--batch-size {batch} is not a multiple of --micro-batch {args.micro_batch} x {world} ranks")
    grad_accum = batch // (args.micro_batch * world)
    if n < batch:
        fail(f"{args.data}: {n} usable samples, fewer than one global batch of {batch}")
    steps_per_epoch = n // batch  # the incomplete last batch of each epoch is dropped
    total = args.max_steps or args.epochs * steps_per_epoch
    save_every = args.save_every or max(1, math.ceil(total / 4))
    fingerprint = hashlib.sha1("\n".join(e.sample.id for e in examples).encode()).hexdigest()
    # What must not change between a run and its resumption (else the weights would differ).
    run_key = dict(total_steps=total, batch_size=batch, lr=args.lr, schedule=args.schedule,
                   warmup_ratio=args.warmup_ratio, seed=args.seed, n_samples=n, data_fingerprint=fingerprint,
                   freeze_vision=args.freeze_vision, group_by_video=args.group_by_video)

    # Resume or start: never silently overwrite a finished or running job's work.
    ckpt = latest_checkpoint(out)
    if ckpt and not args.resume:
        fail(f"{out} already holds a run ({os.path.basename(ckpt)}): pass --resume to continue it, or a new --out")
    state = None
    if ckpt:
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            state = json.load(f)
        before = {"group_by_video": False, **state["run"]}  # checkpoints from before the flag existed
        changed = {k: (before.get(k), v) for k, v in run_key.items() if before.get(k) != v}
        if changed:
            fail(f"cannot resume {ckpt}: changed since the checkpoint (before, now): {changed}")
        if state["step"] >= total and os.path.isfile(os.path.join(out, "model", "config.json")):
            print0(f"{out}: finished ({total} steps); the model is {os.path.join(out, 'model')}. Nothing to do.")
            return

    # Distributed setup and the model.
    device = init_distributed()
    check_shared_dir(out, device)  # rank 0 writes the checkpoints every rank resumes from
    torch.manual_seed(args.seed)
    processor = load_processor(args.model)
    tok = processor.tokenizer
    n_params = count_params(args.model)
    cfg = ds_config(args.micro_batch, grad_accum, args.zero_stage, args.lr, args.bf16, args.grad_clip,
                    args.weight_decay, small_model=n_params < 1e8)
    assert cfg["train_batch_size"] == batch == args.micro_batch * grad_accum * world
    print0(f"global batch {batch} = micro-batch {args.micro_batch} x grad accumulation {grad_accum} x {world} ranks; "
           f"{n} samples, {steps_per_epoch} steps/epoch, {total} steps, checkpoint every {save_every}; "
           f"{n_params:,} parameters\nDeepSpeed config: {json.dumps(cfg)}")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, _keepalive = load_for_training(args.model, cfg, dtype)
    model.config.use_cache = False
    if args.freeze_vision:
        print0(f"vision tower frozen: {freeze_vision(model):,} parameters not trained")
    if args.grad_ckpt:
        model.activation_checkpointing_enable()  # non-reentrant by default in transformers 5.23
    import deepspeed
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=cfg)
    engine.train()

    epoch, index, step = 0, 0, 0  # data position: the epoch and the next sample of its order
    bad_steps, bad_in_a_row = 0, 0  # steps skipped for a NaN or inf loss or gradient: in all, and the last run of them
    if ckpt:
        state = load_checkpoint(engine, ckpt)
        epoch, index, step = state["epoch"], state["index"], state["step"]
        bad_steps, bad_in_a_row = state.get("bad_steps", 0), state.get("bad_in_a_row", 0)
        print0(f"resumed from {ckpt}: step {step}, epoch {epoch}, sample {index} of the epoch's order")
    metrics_path = os.path.join(out, "metrics.jsonl")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"args": vars(args), "deepspeed": cfg, "grad_accum": grad_accum, "world": world,
                       "run": run_key}, f, indent=1)
        keep_steps_upto(metrics_path, step)  # drop the steps a killed run logged after its checkpoint

    def checkpoint_state() -> dict:
        return dict(run=run_key, epoch=epoch, index=index, bad_steps=bad_steps, bad_in_a_row=bad_in_a_row,
                    config=dict(args=vars(args), deepspeed=cfg))

    cache = {} if args.cache_videos else None
    encoded = VisionCache(engine.module, processor) if args.freeze_vision and args.cache_videos else None
    bad_ids: set[str] = set()
    per_rank = args.micro_batch * grad_accum

    def load_at(order: list[int], pos: int, decode: bool = True) -> tuple[Example, tuple | None]:
        """The example at `pos` of the epoch's order and its video (None without `decode`); with
        --skip-bad, an unreadable video is replaced by the next readable example of the order
        (deterministic, so resume replays it)."""
        for j in range(pos, pos + n):
            ex = examples[order[j % n]]
            if ex.sample.id in bad_ids:
                continue
            if not decode:
                return ex, None
            try:
                return ex, load_video_cached(ex.sample, cache, args.nframes, args.max_pixels, args.min_pixels)
            except DataError as e:
                if not args.skip_bad:
                    raise DataError(f"{ex.where}: {e}\n(pass --skip-bad to skip bad samples)") from None
                bad_ids.add(ex.sample.id)
                tqdm.write(f"[rank {rank}] skipping {ex.where}: {e} (--skip-bad)")
        raise DataError(f"{args.data}: no readable video left")

    bar = tqdm(total=total, initial=step, desc="sft", disable=rank != 0, dynamic_ncols=True)
    t_start, step0 = time.time(), step
    groups = [ex.sample.video for ex in examples] if args.group_by_video else None
    order = epoch_order(n, args.seed, epoch, groups)
    while step < total:
        if index + batch > n:  # next epoch
            epoch, index = epoch + 1, 0
            order = epoch_order(n, args.seed, epoch, groups)
        offset = index + rank * per_rank  # this rank's slice of the global batch
        lr = lr_at(step, total, args.lr, args.warmup_ratio, args.schedule)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        # On the engine's device: NCCL reduces CUDA tensors only (gloo, on the CPU, takes either).
        stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, tokens, answer tokens, skipped videos
        loss_finite = True
        for k in range(grad_accum):
            first = offset + k * args.micro_batch
            vkw = dict(nframes=args.nframes, max_pixels=args.max_pixels, min_pixels=args.min_pixels)
            exs = [load_at(order, first + i, decode=False)[0] for i in range(args.micro_batch)]
            if encoded is not None and encoded.agree(exs, device):  # every video's tower output is kept
                inputs = encoded.inputs(exs, processor, vkw).to(device)
            else:
                exs, videos = zip(*[load_at(order, first + i) for i in range(args.micro_batch)])
                inputs = build_inputs(processor, [e.sample for e in exs], videos=list(videos),
                                      answers=[e.target for e in exs], padding_side="right", **vkw).to(device)
                inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
            labels = make_labels(inputs["input_ids"], tok).to(device)
            loss = sft_loss(engine, inputs, labels)
            if encoded is not None:
                encoded.keep(exs, inputs)  # what the tower output in this forward, if it ran
            if step + 1 in args.inject_nan and rank == 0:  # tests only: a bad step on one rank
                loss = loss * float("nan")
            loss_finite = loss_finite and math.isfinite(loss.item())
            engine.backward(loss)
            stats[:3] += torch.tensor([loss.item(), inputs["attention_mask"].sum().item(),
                                       (labels != IGNORE).sum().item()], dtype=torch.float64, device=device)
            if k < grad_accum - 1:
                engine.step()  # not the accumulation boundary: DeepSpeed only counts the micro-batch
        # The boundary: the update, unless a loss or gradient of the step is NaN or inf on any rank. Then
        # every rank skips it (no update, its gradients dropped; model.optimizer_step), and it is counted.
        applied = optimizer_step(engine, loss_finite)
        bad_steps, bad_in_a_row = bad_steps + (not applied), 0 if applied else bad_in_a_row + 1
        stats[3] = len(bad_ids)
        torch.distributed.all_reduce(stats)
        videos = len({examples[order[index + i]].sample.video for i in range(batch)})  # as ordered
        index += batch
        step += 1
        dt = time.time() - t0
        eta = (time.time() - t_start) / (step - step0) * (total - step)
        row = dict(step=step, epoch=epoch, loss=stats[0].item() / (grad_accum * world), lr=lr,
                   tokens=int(stats[1]), answer_tokens=int(stats[2]), videos=videos, tok_per_s=stats[1].item() / dt,
                   sec_per_step=dt, skipped=len(bad) + int(stats[3]), bad_step=not applied, bad_steps=bad_steps)
        if rank == 0:
            tqdm.write(f"step {step}/{total} | loss {row['loss']:.4f} | lr {lr:.1e} | tok/s {row['tok_per_s']:.0f} | "
                       f"{dt:.2f} s/step | ETA {timedelta(seconds=int(eta))}"
                       + (f" | skipped {row['skipped']}" if row["skipped"] else "")
                       + ("" if applied else f" | NaN/inf loss or gradient: step skipped ({bad_in_a_row} in a row, "
                                             f"{bad_steps} in all)"))
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.update(1)
        if bad_in_a_row >= args.max_bad_steps:
            fail(f"{bad_in_a_row} steps in a row (steps {step - bad_in_a_row + 1} to {step}) had a NaN or inf loss "
                 f"or gradient; each was skipped, now the run stops (--max-bad-steps {args.max_bad_steps}). The "
                 f"weights are those of step {step - bad_in_a_row}; the last checkpoint is "
                 f"{latest_checkpoint(out) or '(none)'}. Look at the learning rate and at these steps' samples.")
        if step % save_every == 0 or step == total:
            save_checkpoint(engine, processor, out, step, checkpoint_state(), keep=args.keep_checkpoints)
    bar.close()
    if encoded is not None:
        print0(f"vision cache: {encoded.hits} of {encoded.hits + encoded.misses} micro-batches took the kept vision "
               f"tower outputs of their {len(encoded.kept)} videos (the rest decoded and encoded theirs)")

    save_hf(engine, processor, os.path.join(out, "model"))
    if rank == 0:
        plot_loss(metrics_path, os.path.join(out, "loss.png"))
        print(f"done: {total} steps; final model in {os.path.join(out, 'model')} (metrics: {metrics_path})")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError) as e:  # bad input found mid-run (the message names the file:line and
        sys.exit(f"error: {e}")                 # the sample), or a checkpoint that could not be written
