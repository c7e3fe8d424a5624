r"""Ask a trained model about your own video: its reasoning and the [start, end] span, in seconds.

    # the tiny preset's model on one of its synthetic test videos (CPU, seconds)
    python predict.py --model runs/tiny/grpo/model --video runs/tiny/data/videos/synth01500.mp4 \
        --query "a yellow triangle moves across the screen" --nframes 16 --max-pixels 3136 --min-pixels 3136
    # several queries about one video (decoded and encoded once), a timeline picture with the truth
    python predict.py --model runs/paper/grpo/model --video clip.mp4 \
        --query "the man opens the door" --gt 12.5,17 --query "he sits down" --gt 30,41 --plot timeline.png
    # the spread: 8 sampled answers per query instead of the greedy one; --json for scripts
    python predict.py --model DIR --video clip.mp4 --query "..." --temperature 1.0 --samples 8 --json

The model is a directory (`save_pretrained`: `runs/*/sft/model`, `runs/*/grpo/model`) or a hub id.
The input is built exactly as in training and eval: `data.load_video` samples and resizes the frames,
`data.build_inputs` writes the paper's prompt and hands the processor the real sampling metadata; the
video flags and their defaults are eval.py's (the paper's 64 frames of at most 128*28*28 px, so pass
the tiny preset's `--nframes 16 --max-pixels 3136 --min-pixels 3136` for its models). Decoding is
greedy with no repetition penalty, as in eval.py, unless --temperature > 0.

The video is decoded once, and the vision tower runs once for all of its queries: its features are
handed to `generate` (`mm_encoder_outputs`), which puts them in the prefill instead of re-encoding.
Only the processor's cheap patchifying of the decoded frames is repeated per query.

The span is read with `reward.parse_span`, the reward's strict parser (the last <time>...</time>
block, a clean pair of non-negative seconds). An answer without one is printed raw with "no span could
be read". Exit status: 0 when every answer has a span, 1 when some answer has none, 2 for bad input
(a missing or undecodable video, an empty query, a malformed --gt).

`plot_timeline` draws the picture for --plot (a strip of the frames the model saw, at their real
times, with the true and predicted spans on the same axis); eval.py uses it for its cases.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import data
import reward

# -----------------------------------------------------------------------------
# Records


@dataclass
class Answer:
    query: str
    text: str  # the model's raw answer
    reasoning: str  # the text before <time>, without the <think> tags
    span: list[float] | None  # [start, end] seconds by reward.parse_span; None: no span could be read
    ids: list[int]  # the generated token ids, padding dropped (tests compare them exactly; not in --json)


@dataclass
class Row:
    """One row of a timeline picture: a video's frame strip with true and predicted spans."""
    frames: list  # (H, W, 3) uint8 arrays, the frames the model saw
    times: list[float]  # the second of the video each frame was taken at
    duration: float  # seconds
    title: str  # the query, and in cases.png why this sample was picked
    preds: list  # predicted [start, end] spans (several with --samples); None where no span was read
    gt: list  # true [start, end] spans, possibly none
    reasoning: str = ""  # its start is printed under the strip


def reasoning_of(text: str) -> str:
    """The reasoning part of an answer: what comes before its first <time>, without the think tags."""
    head = text.split(f"<{reward.ANSWER_TAG}>")[0]
    return head.replace(f"<{reward.THINK_TAG}>", "").replace(f"</{reward.THINK_TAG}>", "").strip()


def read_video(path: str, nframes: int, max_pixels: int, min_pixels: int):
    """`data.load_video` of a file a user names: a DataError says when it is missing or undecodable."""
    if not os.path.isfile(path):
        raise data.DataError(f"video not found: {path}")
    probe = data.Sample(id=Path(path).name, video=path, duration=None, query="", spans=[])
    return data.load_video(probe, nframes, max_pixels, min_pixels)


def video_strip(video) -> tuple[list, list[float], float]:
    """(frames as (H, W, 3) uint8, their times in seconds, the video's duration) from `data.load_video`'s
    (frames (T, C, H, W) float 0..255, metadata): frame i was taken at source index frames_indices[i]."""
    frames, meta = video
    imgs = [f.permute(1, 2, 0).clamp(0, 255).byte().numpy() for f in frames]
    times = [i / meta["fps"] for i in meta["frames_indices"]]
    return imgs, times, meta["total_num_frames"] / meta["fps"]


# -----------------------------------------------------------------------------
# The answers


def generation_kwargs(tokenizer, max_new_tokens: int, temperature: float) -> dict:
    """eval.py's greedy decoding (temperature 0), or plain sampling at `temperature`; no repetition
    penalty either way, set explicitly over the checkpoint's generation config."""
    from model import suppress_ids
    if temperature > 0:
        how = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        how = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(max_new_tokens=max_new_tokens, repetition_penalty=1.0, suppress_tokens=suppress_ids(tokenizer), **how)


def generate_encoded(model, processor, samples: list, videos: list, encoded: dict, gen_kwargs: dict,
                     num_return_sequences: int = 1, nframes: int = data.NFRAMES, max_pixels: int = data.MAX_PIXELS,
                     min_pixels: int = data.MIN_PIXELS):
    """One `generate` call, a left-padded row per sample (`videos`: their `data.load_video` results), with
    every video through the vision tower at most once: `encoded` maps a video path to the tower's output
    and is filled here the first time a video comes up. The caller keeps it for the video's other queries
    (this file for all of them, eval.py while they last). -> (rows * num_return_sequences, new) token ids.

    The answers are those of `generate` given the pixels: it would compute the same features from the
    same pixels (one call, one video), and takes them here in their place (`mm_encoder_outputs`)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    inputs = data.build_inputs(processor, samples, videos, nframes=nframes, max_pixels=max_pixels,
                               min_pixels=min_pixels, padding_side="left").to(model.device)
    pixels = inputs.pop("pixel_values_videos")  # (patches of all rows, C * t * p * p): only patchifying is redone
    grids = inputs["video_grid_thw"]  # (rows, 3): each row's video in (t, h, w) patches
    ends = grids.prod(1).cumsum(0).tolist()  # where each row's patches end in `pixels`
    with torch.inference_mode():
        for s, grid, end in zip(samples, grids, ends):
            if s.video not in encoded:  # (video tokens, hidden)
                n = int(grid.prod())
                encoded[s.video] = model.get_video_features(pixels[end - n:end], grid[None]).pooler_output[0]
        feats = BaseModelOutputWithPooling(pooler_output=tuple(encoded[s.video] for s in samples))
        seqs = model.generate(**inputs, mm_encoder_outputs={"video": feats},  # a fresh dict: generate edits it
                              num_return_sequences=num_return_sequences, **gen_kwargs)  # (rows * n, prompt + new)
    return seqs[:, inputs["input_ids"].shape[1]:]


def generate_shared_prompts(model, processor, samples: list, videos: list, encoded: dict, gen_kwargs: dict,
                            nframes: int = data.NFRAMES, max_pixels: int = data.MAX_PIXELS,
                            min_pixels: int = data.MIN_PIXELS):
    """Like `generate_encoded` (one generate call, a row per sample, each video through the vision tower
    at most once), with each video's prompt prefilled once for all of its queries in the batch.
    -> (len(samples), new) token ids.

    The queries about one video share their prompt up to the query ([system; video; ...]: P_v tokens,
    the longest common prefix) and differ after it. One forward prefills the V videos' prefixes,
    left-padded to the longest (V, max P_v); its cache rows are then picked for each query's row
    (rows, H_kv, max P_v, d). A row is [pad; prefix_v; pad; suffix_q] (rows, max P_v + max suffix), the
    pads masked, and generate computes the suffixes and decodes every row together. Positions stay
    those of the unpadded prompt: generate counts a row's positions by its attention mask's cumulative
    sum (pads do not count) plus its video's rope offset from the prefill (the text after a video
    resumes after its last position).

    Not bit-identical to asking each query alone (batch 1): a row's sums run in another order in a
    batched matmul, so a greedy near-tie can flip."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    vkw = dict(nframes=nframes, max_pixels=max_pixels, min_pixels=min_pixels)
    dev, pad = model.device, processor.tokenizer.pad_token_id
    order = list(dict.fromkeys(s.video for s in samples))  # the batch's V videos, in order of first row
    vid = [order.index(s.video) for s in samples]  # each row's video
    first = [vid.index(k) for k in range(len(order))]  # each video's first row
    inputs = data.build_inputs(processor, [samples[i] for i in first], [videos[i] for i in first], **vkw).to(dev)
    keep, grids = inputs["attention_mask"].bool(), inputs["video_grid_thw"]  # (V, L), (V, 3)
    rows = [None] * len(samples)  # each row's unpadded prompt ids
    for k, i in enumerate(first):  # the video processed once, its other queries only tokenized
        rows[i] = inputs["input_ids"][k][keep[k]]
        rest = [j for j in range(len(samples)) if vid[j] == k and j != i]
        n_video = int(grids[k].prod()) // model.config.vision_config.spatial_merge_size ** 2
        for j, r in zip(rest, data.prompt_ids(processor, [samples[j] for j in rest], n_video, **vkw)):
            rows[j] = r.to(dev)
    P = []  # each video's common prefix, leaving every row at least one token for generate to compute
    for k in range(len(order)):
        own = [r for r, v in zip(rows, vid) if v == k]
        shortest = min(len(r) for r in own)
        same = torch.stack([r[:shortest] for r in own]).eq(own[0][:shortest]).all(0)
        P.append(min(int(same.long().cumprod(0).sum()), shortest - 1))
        if not (own[0][P[-1]:] != model.config.video_token_id).all():
            raise ValueError(f"{order[k]}: the prompts' common prefix does not hold the whole video")
    Pmax, S = max(P), max(len(r) - P[v] for r, v in zip(rows, vid))
    ids = torch.full((len(order), Pmax), pad, dtype=torch.long, device=dev)  # (V, Pmax) prefixes, left-padded
    mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
    for k, i in enumerate(first):
        ids[k, Pmax - P[k]:], mask[k, Pmax - P[k]:] = rows[i][:P[k]], 1
        types[k, Pmax - P[k]:] = inputs["mm_token_type_ids"][k][keep[k]][:P[k]]
    with torch.inference_mode():
        todo = [k for k, v in enumerate(order) if v not in encoded]
        if todo:  # one vision call for the batch's new videos
            ends = grids.prod(1).cumsum(0).tolist()
            pixels = torch.cat([inputs["pixel_values_videos"][ends[k] - int(grids[k].prod()):ends[k]] for k in todo])
            for k, f in zip(todo, model.get_video_features(pixels, grids[todo]).pooler_output):
                encoded[order[k]] = f
        feats = BaseModelOutputWithPooling(pooler_output=tuple(encoded[v] for v in order))
        cache = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, video_grid_thw=grids,
                      second_per_grid_ts=inputs["second_per_grid_ts"], mm_encoder_outputs={"video": feats},
                      use_cache=True, logits_to_keep=1).past_key_values
        pick = torch.tensor(vid, device=dev)
        cache.batch_select_indices(pick)  # (rows, H_kv, Pmax, d): each row its video's prefix
        model.model.rope_deltas = model.model.rope_deltas[pick]  # (rows, 1)
        full = torch.full((len(samples), Pmax + S), pad, dtype=torch.long, device=dev)
        full_mask = torch.zeros_like(full)
        full[:, :Pmax], full_mask[:, :Pmax] = ids[pick], mask[pick]
        for i, (r, k) in enumerate(zip(rows, vid)):  # the suffix right-aligned: pads between prefix and suffix
            full[i, Pmax + S - (len(r) - P[k]):], full_mask[i, Pmax + S - (len(r) - P[k]):] = r[P[k]:], 1
        seqs = model.generate(input_ids=full, attention_mask=full_mask, past_key_values=cache, **gen_kwargs)
    return seqs[:, Pmax + S:]


def answer(model, processor, video_path: str, video, queries: list[str], gen_kwargs: dict, samples: int = 1,
           nframes: int = data.NFRAMES, max_pixels: int = data.MAX_PIXELS, min_pixels: int = data.MIN_PIXELS
           ) -> list[list[Answer]]:
    """`samples` answers to each query about one video; `video` is `data.load_video`'s result. The
    vision tower runs once: its output is passed to every generate call in place of the pixels."""
    encoded, out = {}, []
    for q in queries:
        s = data.Sample(id=Path(video_path).stem, video=video_path, duration=None, query=q, spans=[])
        new = generate_encoded(model, processor, [s], [video], encoded, gen_kwargs, samples, nframes, max_pixels,
                               min_pixels)  # (samples, new)
        texts = processor.batch_decode(new, skip_special_tokens=True)
        pad = processor.tokenizer.pad_token_id
        out.append([Answer(query=q, text=t, reasoning=reasoning_of(t),
                           span=None if (sp := reward.parse_span(t)) is None else list(sp),
                           ids=[i for i in row.tolist() if i != pad]) for t, row in zip(texts, new)])
    return out


# -----------------------------------------------------------------------------
# The timeline picture (also eval.py's cases.png)

MAX_THUMBS = 32  # more frames than this (the paper's 64) are thinned for the picture


def _plain(text: str, width: int) -> str:
    """One line of at most `width` characters that matplotlib draws as is: a model's raw answer can
    hold control characters, and a `$` would start mathtext."""
    text = "".join(c if c.isprintable() else " " for c in text)
    return textwrap.shorten(text, width, placeholder=" ...").replace("$", r"\$")


def plot_timeline(rows: list[Row], path: str | Path, width: float = 10.0) -> None:
    """One row per query: the frame strip with each thumbnail starting at the second it was taken,
    the true spans (green) and the predicted ones (orange) below it on the same axis, the query on
    top and the start of the reasoning underneath."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, 1.9 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        step = max(1, math.ceil(len(r.frames) / MAX_THUMBS))
        frames, times = r.frames[::step], r.times[::step]
        w = r.duration / len(frames)  # thumbnails tile the axis; each starts at its frame's time
        for img, t in zip(frames, times):
            ax.imshow(img, extent=(t, t + w, 1.25, 3.25), aspect="auto", interpolation="nearest")
        for s, e in r.gt:
            ax.broken_barh([(s, e - s)], (0.7, 0.4), color="tab:green")
        readable = [p for p in r.preds if p is not None]
        h = 0.4 / max(1, len(readable))  # several samples: thin bars stacked in the prediction lane
        for k, (s, e) in enumerate(readable):
            ax.broken_barh([(s, max(e - s, r.duration / 400))], (0.15 + k * h, h * 0.9), color="tab:orange")
        if len(readable) < len(r.preds):
            ax.text(r.duration / 2, 0.35, f"{len(r.preds) - len(readable)} answer(s) without a readable span",
                    ha="center", va="center", fontsize=7, color="tab:red")
        ax.set_xlim(0, r.duration)
        ax.set_ylim(0.05, 3.35)
        ax.set_yticks([0.35, 0.9], ["predicted", "true"] if r.gt else ["predicted", ""], fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:g} s")  # the unit on the ticks: no label to collide with
        ax.set_title(_plain(r.title, 130), fontsize=9, loc="left")
        if r.reasoning:
            ax.text(0, -0.32, _plain(r.reasoning, 150), transform=ax.transAxes, fontsize=7.5,
                    color="0.3", style="italic", va="top")
    fig.tight_layout(h_pad=1.6)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -----------------------------------------------------------------------------
# The command line


def parse_gt(text: str) -> list[float]:
    try:
        s, e = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,END in seconds, e.g. 12.5,17; got {text!r}") from None
    if not (math.isfinite(s) and math.isfinite(e) and 0 <= s <= e):
        raise argparse.ArgumentTypeError(f"a span needs 0 <= START <= END; got {text!r}")
    return [s, e]


def add_model_flags(ap: argparse.ArgumentParser) -> None:
    """The flags that decide an answer, shared with demo.py so that both answer alike by default."""
    ap.add_argument("--model", required=True, help="model directory (save_pretrained) or hub id")
    # --- video input (eval.py's flags and defaults: the paper's setting)
    ap.add_argument("--nframes", type=int, default=data.NFRAMES, help="frames sampled from the video")
    ap.add_argument("--max-pixels", type=int, default=data.MAX_PIXELS, help="max pixels per frame (128*28*28)")
    ap.add_argument("--min-pixels", type=int, default=data.MIN_PIXELS, help="min pixels per frame")
    # --- generation
    ap.add_argument("--max-new-tokens", type=int, default=2048, help="answer length cap (eval.py's default)")
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                    help="auto: bfloat16 on GPU, float32 on CPU")


def load(a: argparse.Namespace):
    """(model, processor) for --model on the GPU if there is one, in --dtype."""
    import torch
    from model import load_model, load_processor
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    return load_model(a.model, dtype).to(device).eval(), load_processor(a.model)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(ap)
    # --- what to ask
    ap.add_argument("--video", required=True, help="the video file (any format decord reads: mp4, mkv, avi, ...)")
    ap.add_argument("--query", action="append", required=True,
                    help="what to find in the video; repeat for several queries about the same video")
    ap.add_argument("--gt", action="append", type=parse_gt, default=[], metavar="START,END",
                    help="the true span of each query, in the order of --query (drawn and scored: IoU)")
    # --- sampling
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample at it")
    ap.add_argument("--samples", type=int, default=1, help="answers per query (needs --temperature > 0 when > 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    # --- output
    ap.add_argument("--plot", metavar="PNG", help="write the timeline picture: frame strip, true and predicted spans")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    a = ap.parse_args(argv)
    if any(not q.strip() for q in a.query):
        ap.error("--query is empty: say what to find in the video, e.g. --query \"the man opens the door\"")
    if a.gt and len(a.gt) != len(a.query):
        ap.error(f"give one --gt per --query (in the same order): got {len(a.gt)} for {len(a.query)} queries")
    if a.samples < 1 or a.max_new_tokens < 1 or a.nframes < 2:
        ap.error("--samples and --max-new-tokens must be >= 1, --nframes >= 2")
    if a.samples > 1 and a.temperature <= 0:
        ap.error("--samples > 1 needs --temperature > 0 (greedy answers would all be the same)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    try:  # the video first: a bad file stops here, before the model is loaded
        video = read_video(a.video, a.nframes, a.max_pixels, a.min_pixels)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch
    model, processor = load(a)
    torch.manual_seed(a.seed)
    answers = answer(model, processor, a.video, video, [q.strip() for q in a.query],
                     generation_kwargs(processor.tokenizer, a.max_new_tokens, a.temperature), a.samples,
                     a.nframes, a.max_pixels, a.min_pixels)

    frames, times, duration = video_strip(video)
    gts = a.gt or [None] * len(a.query)

    def iou(x: Answer, gt) -> float | None:
        return None if gt is None or x.span is None else reward.temporal_iou(x.span, gt)

    def record(x: Answer, gt) -> dict:  # an answer in --json: its fields but the token ids, with the truth
        d = asdict(x)
        del d["ids"]
        return dict(d, gt=gt, iou=iou(x, gt))

    if a.json:  # "answers": one list per query, of --samples answers each
        print(json.dumps({"video": a.video, "duration": duration, "frames": len(frames),
                          "answers": [[record(x, gt) for x in per_query] for per_query, gt in zip(answers, gts)]}))
    else:
        h, w = frames[0].shape[:2]
        print(f"{a.video}: {duration:.2f} s, {len(frames)} frames of {w}x{h} px, decoded and encoded once "
              f"for {len(a.query)} quer{'y' if len(a.query) == 1 else 'ies'}")
        for k, (per_query, gt) in enumerate(zip(answers, gts), 1):
            print(f"\n[{k}] {per_query[0].query}")
            for j, x in enumerate(per_query, 1):
                pre = f"    sample {j}/{len(per_query)} " if len(per_query) > 1 else "    "
                if x.span is None:
                    print(f"{pre}raw answer: {x.text!r}")
                    print(f"{pre}no span could be read from the answer (expected <time>[start, end]</time>)")
                    continue
                print(f"{pre}reasoning: {x.reasoning}")
                score = "" if gt is None else f"   (true [{gt[0]:.2f}, {gt[1]:.2f}] s, IoU {iou(x, gt):.2f})"
                print(f"{pre}span: [{x.span[0]:.2f}, {x.span[1]:.2f}] s{score}")
            spans = [x.span for x in per_query if x.span is not None]
            if len(per_query) > 1 and spans:
                print(f"    spread over {len(per_query)} samples: {len(spans)} with a span, start "
                      f"{min(s for s, _ in spans):.2f}-{max(s for s, _ in spans):.2f} s, "
                      f"end {min(e for _, e in spans):.2f}-{max(e for _, e in spans):.2f} s")
    if a.plot:
        rows = [Row(frames, times, duration, title=f'"{per_query[0].query}"', preds=[x.span for x in per_query],
                    gt=[gt] if gt else [], reasoning=per_query[0].reasoning or per_query[0].text)
                for per_query, gt in zip(answers, gts)]
        plot_timeline(rows, a.plot)
        if not a.json:
            print(f"\nwrote {a.plot}")
    return 1 if any(x.span is None for per_query in answers for x in per_query) else 0


if __name__ == "__main__":
    sys.exit(main())
