"""Evaluation: answer every test query with the model, then score the answers the way the paper did.

    # CPU, the tiny preset (synthetic test set, tiny model, tiny video setting)
    python eval.py --model runs/tiny/base_model --data runs/tiny/data/test.jsonl --out runs/tiny/eval \
                   --nframes 16 --max-pixels 3136 --min-pixels 3136 --max-new-tokens 64
    # 1 GPU, a real benchmark with the paper's setting (64 frames of at most 128*28*28 px, greedy, 2048 tokens)
    python eval.py --model runs/paper/grpo --format charades_sta \
                   --data assets/charades_sta/charades_sta_test.txt --video-root /data/charades/videos \
                   --durations /data/charades/durations.json --out runs/paper/eval/charades_sta
    # 8 GPUs: the videos are sharded over the ranks (8x faster), the answers merged back in file order
    torchrun --nproc_per_node 8 eval.py --model runs/paper/grpo --data test.jsonl --out runs/paper/eval/test
    # re-score any predictions file (ours, or another model's), with the paper's parser, reward.py's or TaRO's
    python eval.py score runs/paper/eval/charades_sta/predictions.jsonl [--parse official|strict|taro] [--json]
    # the best constant span fitted on the train set, scored on the test set (what a blind model gets)
    python eval.py baseline --train runs/tiny/data/train.jsonl --test runs/tiny/data/test.jsonl --out runs/tiny/eval/constant

Outputs in --out: `predictions.jsonl` (one line per sample: id, source, query, response, gt spans,
duration), `metrics.json` (percent, full precision), `cases.png` (like the paper's Figure 3: the best,
the worst and a few random samples, their frames, true and predicted spans and the start of the
reasoning; --cases) and, with --allow-missing, `missing_videos.txt`.
Each video is decoded once and goes through the vision tower once for all of its queries (NExT-GQA
asks 5,553 questions about 990 videos, Charades-STA 3,720 about 1,334): the videos, in order of first
appearance, are dealt round-robin to the ranks and a rank answers a video's queries one after the
other, the tower's output handed to `generate` in place of the pixels (`predict.generate_encoded`).
The answers are identical to asking each query alone (`--no-group-videos`, the old way: every query
decodes and encodes its video; bench.py compares the two): the same pixels give the same features,
and each generate call sees the same inputs. That holds at the default --batch-size 1. More queries per
call (from one video or the next) are decoded together, and with grouping the queries of one video in
a call share one prefill of their prompt up to the query (`predict.generate_shared_prompts`: the
prefix's cache repeated for its rows, each row [pad; prefix; pad; query], positions as if unpadded).
Batched sums run in another order, which can flip a greedy near-tie: faster, not bit-identical.
A killed run loses at most one batch: each rank appends to `predictions.rank{R}.jsonl` after every
batch, and a re-run skips every id already answered (a video answered in part is decoded again for the
rest). `eval_args.json` records the settings that shape the answers; a re-run with other settings into
the same --out is refused instead of mixing answers.

Scoring protocols (`--parse`):
* official (default): the released scorer of the paper, VideoMind's eval_auto.py in the TVG-R1 repo as
  of its commit c818166 (2025-08-05), for every source: `reward.parse_span_official` (the first
  one-line <time>...</time>, else the whole response, then its first two unsigned numbers).
  Fewer than two numbers -> [0, 0]; the span is scored as read: a reversed span scores 0, nothing is
  clamped to the video. A `pred: [s, e]` line (no response) is scored as read too.
* official-0724: the same scorer as first released (b261460, 2025-07-24). Its `charades_sta` branch
  took the first two unsigned numbers ANYWHERE in the response, ignoring the <time> tag, so numbers
  written inside <think> won; c818166 gave Charades-STA the rule of the other sources. Other sources
  as official.
* strict: `reward.parse_span`, the GRPO reward's parser; an answer it rejects scores IoU 0. No
  clamping either, so it differs from official only in the parser.
* taro: TaRO's released evaluation (oceanflowlab/TaRO @ 143a234, standalone_eval/evaluate_vtg.py):
  `reward.parse_span_taro`, the LAST two unsigned numbers anywhere in the response, swapped when
  reversed; fewer than two -> IoU 0. A `pred` line is swapped when reversed too. Its IoU divides by
  max(ends) - min(starts), equal to the union whenever the spans overlap (else IoU is 0 anyway): the
  same value up to float rounding.
In all: a sample with several GT spans scores its best IoU; R1@m counts IoU >= m; every sample
counts in the denominator. IoP (intersection / predicted length, best over the GT spans; NExT-GQA's
metric) is reported for the `nextgqa` source, and in the overall row only when every sample is nextgqa.

Known differences from the released scorer: it computes IoU in float32 (torch), we use float64, so a
sample within float rounding of a threshold can land on the other side (about 1 in 1,000
sample-threshold pairs for one-decimal spans); it decodes with special tokens kept and we skip them
(they hold no digits); and it reuses the previous sample's IoP after an answer with one number (a bug).

Inputs go through `data.build_inputs`, the function SFT and GRPO use (real `second_per_grid_ts`).
Decoding is greedy with no repetition penalty (the released inference passes repetition_penalty=None;
the Qwen2.5-VL checkpoint's own generation config would apply 1.05).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import reward
from data import DataError, drop_torn_tail, json_lines, read_jsonl, read_text, write_jsonl

PARSERS = ("official", "official-0724", "strict", "taro")  # see "Scoring protocols" above
PARSE_HELP = ("official: the paper's released scorer (default); official-0724: its first release (Charades-STA: "
              "the first two numbers anywhere); strict: reward.py's parser; taro: TaRO's (the last two numbers)")
THRESHOLDS = (0.3, 0.5, 0.7)
IOP_THRESHOLDS = (0.3, 0.5)  # NExT-GQA reports IoP@0.3, IoP@0.5 and mIoP
IOP_SOURCES = ("nextgqa",)

# -----------------------------------------------------------------------------
# Prediction records (predictions.jsonl, or any file `score` is given)


@dataclass
class Prediction:
    id: str
    source: str
    gt: list[list[float]]  # one or more GT [start, end]
    response: str | None = None  # the model's text; None when the line gives `pred` instead
    pred: list[float] | None = None  # a span given directly (another model's file)
    query: str | None = None
    duration: float | None = None


def _number(x, where: str, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise DataError(f"{where}: {what} must be a number, got {x!r}")
    if not math.isfinite(x):  # a NaN would make every IoU with it NaN, and the metrics with them
        raise DataError(f"{where}: {what} must be finite, got {x!r}")
    return float(x)


def _span(x, where: str, what: str) -> list[float]:
    if not (isinstance(x, list) and len(x) == 2):
        raise DataError(f"{where}: {what} must be [start, end], got {x!r}")
    return [_number(v, where, what) for v in x]


def prediction_from_dict(d, where: str) -> Prediction:
    """One line of a predictions file; `where` is 'file:line' for the error message. Our own lines
    have `response`; a line may give `pred: [s, e]` (or VideoMind's `[[s, e], ...]`, top-1 first)
    instead. `span` is accepted for `gt` (VideoMind's name); a line without `id` is named by `where`."""
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
    gt = d.get("gt", d.get("span"))
    if gt is None:
        raise DataError(f"{where}: missing field gt (the ground-truth spans)")
    if isinstance(gt, list) and len(gt) == 2 and not isinstance(gt[0], list):
        gt = [gt]  # one span written flat
    if not (isinstance(gt, list) and gt):
        raise DataError(f"{where}: gt must be a non-empty list of [start, end], got {gt!r}")
    gt = [_span(g, where, "each gt span") for g in gt]
    response, pred = d.get("response"), d.get("pred")
    if response is not None:
        if not isinstance(response, str):
            raise DataError(f"{where}: response must be a string, got {type(response).__name__}")
        pred = None  # the response is re-parsed, as the paper's scorer does
    elif pred is None:
        raise DataError(f"{where}: needs a response (the model's text) or a pred [start, end]")
    else:
        if isinstance(pred, list) and pred and isinstance(pred[0], list):
            pred = pred[0]
        pred = _span(pred, where, "pred")
    duration = d.get("duration")
    if duration is not None:
        duration = _number(duration, where, "duration")
    query = d.get("query", d.get("question"))
    return Prediction(id=str(d.get("id", where)), source=str(d.get("source") or ""), gt=gt,
                      response=response, pred=pred, query=query if isinstance(query, str) else None,
                      duration=duration)


def read_predictions(path: str | Path) -> list[Prediction]:
    """A JSONL file (one prediction per line), or a JSON list (e.g. VideoMind's output.json). An id
    may appear once: a sample counted twice would change every metric."""
    path = Path(path)
    text = read_text(path)  # a BOM is dropped; bytes that are not UTF-8 are named by their line
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        records = [(f"{path}: item {i}", d) for i, d in enumerate(items)]
    else:
        records = list(json_lines(path))
    out, seen = [], {}
    for where, d in records:
        p = prediction_from_dict(d, where)
        if p.id in seen:
            raise DataError(f"{where}: id {p.id!r} appears again (first at {seen[p.id]})")
        seen[p.id] = where
        out.append(p)
    if not out:
        raise DataError(f"{path}: no predictions in the file")
    return out


# -----------------------------------------------------------------------------
# Scoring (pure: records in, metrics out; the IoU math and the parsers live in reward.py)

def official_span(response: str, source: str, parse: str = "official") -> list[float]:
    """The span the paper's scorer reads: through the first <time> tag for every source (official,
    c818166), except Charades-STA under official-0724, whose branch took the first two numbers of the
    whole response, tags or not (b261460)."""
    if parse == "official-0724" and source == "charades_sta":
        return reward.first_two_numbers(response)
    return reward.parse_span_official(response)


def predicted_span(p: Prediction, parse: str = "official") -> list[float] | None:
    """The span that gets scored, or None (strict or taro found no span: IoU 0)."""
    if p.response is None:  # a span given directly
        if parse in ("official", "official-0724"):
            return p.pred
        s, e = p.pred
        if parse == "taro":  # TaRO swaps a reversed pair
            return [min(s, e), max(s, e)]
        ok = math.isfinite(s) and math.isfinite(e) and 0 <= s <= e  # strict: parse_span's checks
        return p.pred if ok else None
    if parse in ("official", "official-0724"):
        return official_span(p.response, p.source, parse)
    span = reward.parse_span_taro(p.response) if parse == "taro" else reward.parse_span(p.response)
    return None if span is None else list(span)


def _block(pairs: list[tuple[float, float]], with_iop: bool) -> dict:
    m = reward.grounding_metrics([iou for iou, _ in pairs], THRESHOLDS)
    if with_iop:
        iops = reward.grounding_metrics([x for _, x in pairs], IOP_THRESHOLDS, prefix="IoP")
        m.update({k: v for k, v in iops.items() if k != "n"})
    return m


def score_predictions(records: list[Prediction], parse: str = "official") -> dict:
    """{"overall": {R1@0.3, R1@0.5, R1@0.7, mIoU, n}, "per_source": {source: {...}}, "parse": parse},
    percent at full precision; nextgqa blocks add IoP@0.3, IoP@0.5 and mIoP."""
    if parse not in PARSERS:
        raise ValueError(f"parse must be one of {PARSERS}, got {parse!r}")
    by_source: dict[str, list[tuple[float, float]]] = {}
    for p in records:
        span = predicted_span(p, parse)
        iou = 0.0 if span is None else reward.official_iou(span, p.gt)
        iop = 0.0 if span is None else max(reward.iop(span, g) for g in p.gt)
        by_source.setdefault(p.source, []).append((iou, iop))
    every = [x for pairs in by_source.values() for x in pairs]
    return {"overall": _block(every, bool(by_source) and set(by_source) <= set(IOP_SOURCES)),
            "per_source": {s: _block(by_source[s], s in IOP_SOURCES) for s in sorted(by_source)},
            "parse": parse}


def format_table(metrics: dict) -> str:
    """The paper's table: one row per source, then overall; 2 decimals. An IoP table follows when
    a NExT-GQA block is present."""
    rows = [(s or "-", m) for s, m in metrics["per_source"].items()] + [("overall", metrics["overall"])]
    w = max(len(s) for s, _ in rows) + 2
    out = [f"{'source':<{w}}{'n':>6}" + "".join(f"{k:>9}" for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU"))]
    for s, m in rows:
        out.append(f"{s:<{w}}{m['n']:>6}" + "".join(f"{m[k]:>9.2f}" for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")))
    iop_rows = [(s, m) for s, m in rows if "mIoP" in m]
    if iop_rows:
        out.append("")
        out.append(f"{'source':<{w}}{'n':>6}" + "".join(f"{k:>9}" for k in ("IoP@0.3", "IoP@0.5", "mIoP")))
        for s, m in iop_rows:
            out.append(f"{s:<{w}}{m['n']:>6}" + "".join(f"{m[k]:>9.2f}" for k in ("IoP@0.3", "IoP@0.5", "mIoP")))
    return "\n".join(out)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def score_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="eval.py score", description="Re-score a predictions file "
                                 "(our predictions.jsonl, or any JSONL/JSON list with gt and response or pred).")
    ap.add_argument("predictions", help="predictions file: JSONL lines (or a JSON list) with gt and response|pred")
    ap.add_argument("--parse", choices=PARSERS, default="official", help=PARSE_HELP)
    ap.add_argument("--json", action="store_true",
                    help="print the metrics as one JSON line (percent, full precision) instead of a table")
    a = ap.parse_args(argv)
    m = score_predictions(read_predictions(a.predictions), a.parse)
    if a.json:
        print(json.dumps({**m["overall"], "per_source": m["per_source"], "parse": m["parse"]}))
    else:
        print(f"{a.predictions} (parse: {a.parse})")
        print(format_table(m))


def baseline_main(argv: list[str]) -> None:
    """The best constant answer: the single [s, e] (on a grid) with the highest mean IoU on the TRAIN
    set, answered for every test sample and scored like a model's predictions. A model that does not
    beat it has not learned to read the video."""
    import numpy as np
    ap = argparse.ArgumentParser(prog="eval.py baseline", description=baseline_main.__doc__)
    ap.add_argument("--train", required=True, help="Sample JSONL the constant span is fitted on")
    ap.add_argument("--test", required=True, help="Sample JSONL it is scored on")
    ap.add_argument("--out", required=True, help="output dir: predictions.jsonl and metrics.json")
    ap.add_argument("--grid", type=float, default=0.25, help="grid step of the candidate spans (seconds)")
    a = ap.parse_args(argv)
    train, test = read_jsonl(a.train), read_jsonl(a.test)
    gt = [sp for s in train for sp in s.spans[:1]]  # (N, 2): the first GT span of each train sample
    gt = np.array(gt, dtype=np.float64)
    t = np.arange(0.0, gt.max() + a.grid, a.grid)
    s, e = np.meshgrid(t, t, indexing="ij")
    cand = np.stack([s[s < e], e[s < e]], 1)  # (C, 2) every span on the grid
    best, best_iou = None, -1.0
    for chunk in np.array_split(cand, max(1, len(cand) // 2048)):  # (c, N) IoUs, in memory-sized chunks
        inter = np.clip(np.minimum(chunk[:, None, 1], gt[None, :, 1]) - np.maximum(chunk[:, None, 0], gt[None, :, 0]), 0, None)
        union = (chunk[:, None, 1] - chunk[:, None, 0]) + (gt[None, :, 1] - gt[None, :, 0]) - inter
        miou = (inter / np.where(union > 0, union, np.inf)).mean(1)
        if miou.max() > best_iou:
            best_iou, best = float(miou.max()), chunk[int(miou.argmax())].tolist()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    preds = [{"id": x.id, "source": x.source, "query": x.query, "pred": best, "gt": x.spans, "duration": x.duration}
             for x in test]
    write_jsonl(out / "predictions.jsonl", preds)
    m = score_predictions(read_predictions(out / "predictions.jsonl"))
    m.update(constant_span=best, train_mIoU=100 * best_iou, train=a.train, test=a.test)
    _write_json(out / "metrics.json", m)
    print(f"best constant span on {a.train}: [{best[0]:.2f}, {best[1]:.2f}] (train mIoU {100 * best_iou:.2f})")
    print(format_table(m))


# -----------------------------------------------------------------------------
# Generation: resumable, sharded over ranks


def read_done(out: Path) -> dict[str, dict]:
    """Finished answers from earlier or interrupted runs: predictions.jsonl, then any rank files.
    A rank file's last line without its newline was cut short by a kill (even if what was written
    parses: the buffered write may stop right before the newline): it is not an answer, and its rank
    drops it before appending (_trim_partial_line), so it is asked again."""
    done: dict[str, dict] = {}
    for path in [out / "predictions.jsonl", *sorted(out.glob("predictions.rank*.jsonl"))]:
        if path.exists():
            for where, d in json_lines(path, complete_only=True):
                done.setdefault(prediction_from_dict(d, where).id, d)
    return done


def _trim_partial_line(path: Path) -> None:
    """Drop a half-written last line so the next append starts on a line of its own."""
    drop_torn_tail(path)


def prefetched_batches(samples: list, batch_size: int, load, workers: int, key=lambda s: s.id):
    """Yield (batch, videos) while the next batch's videos decode in threads: video decoding would
    otherwise leave the GPU idle (workers 0: no decoding ahead). Samples with the same `key` share one
    decode, also across two batches (eval's key is the video path: a video's queries come one after the
    other). Only the frames of two batches are held in memory."""
    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    ahead = 1 if workers > 0 else 0
    held = {}  # key -> Future of its decoded video, for this batch and the `ahead` next ones
    with ThreadPoolExecutor(max(1, workers)) as ex:
        for i, chunk in enumerate(chunks):
            wanted = [s for c in chunks[i:i + 1 + ahead] for s in c]
            held = {key(s): held.get(key(s)) for s in wanted}  # the frames of finished videos are let go
            for s in wanted:
                if held[key(s)] is None:
                    held[key(s)] = ex.submit(load, s)
            yield chunk, [held[key(s)].result() for s in chunk]


def by_video(samples: list, rank: int = 0, world: int = 1) -> list:
    """This rank's samples, whole videos at a time: the videos, in order of first appearance, are dealt
    round-robin (all queries of a video on one rank, the same deal in every run), and a video's queries
    follow one another in file order."""
    order: dict[str, int] = {}
    for s in samples:
        order.setdefault(s.video, len(order))
    return sorted((s for s in samples if order[s.video] % world == rank), key=lambda s: order[s.video])


def answer_batches(model, processor, todo: list, gen_kwargs: dict, batch_size: int, group_videos: bool,
                   workers: int, nframes: int, max_pixels: int, min_pixels: int):
    """Yield (batch, responses), `batch_size` queries per generate call, in the order of `todo` (`by_video`).
    group_videos: a video's queries share one decode and one pass of the vision tower; else every query
    decodes its video and `generate` encodes it again from the pixels (the old way, for comparison).
    group_videos with batch_size > 1: the queries of a video in one batch also share one prefill of
    their prompt up to the query (predict.generate_shared_prompts)."""
    import torch
    import data
    import predict
    vkw = dict(nframes=nframes, max_pixels=max_pixels, min_pixels=min_pixels)
    encoded = {}  # video path -> the vision tower's output, while the video's queries last
    key = (lambda s: s.video) if group_videos else (lambda s: s.id)
    for batch, videos in prefetched_batches(todo, batch_size, lambda s: data.load_video(s, **vkw), workers, key):
        if group_videos:
            now = {s.video for s in batch}
            encoded = {v: f for v, f in encoded.items() if v in now}  # a video not in this batch is finished
            if len(batch) > 1:
                new = predict.generate_shared_prompts(model, processor, batch, videos, encoded, gen_kwargs, **vkw)
            else:
                new = predict.generate_encoded(model, processor, batch, videos, encoded, gen_kwargs, **vkw)
        else:
            inputs = data.build_inputs(processor, batch, videos, padding_side="left", **vkw).to(model.device)
            with torch.inference_mode():
                new = model.generate(**inputs, **gen_kwargs)[:, inputs["input_ids"].shape[1]:]  # (B, new)
        yield batch, processor.batch_decode(new, skip_special_tokens=True)


def load_samples(a) -> list:
    import data
    if a.format:
        samples = data.read_benchmark(a.format, a.data, video_root=a.video_root, durations=a.durations)
    else:
        samples = data.read_jsonl(a.data)
    samples = samples[: a.limit] if a.limit else samples
    seen = set()
    for s in samples:
        if s.id in seen:  # ids key the resume and the merge
            raise DataError(f"{a.data}: sample id {s.id!r} appears more than once")
        seen.add(s.id)
    if not samples:
        raise DataError(f"{a.data}: no samples")
    return samples


# Settings that shape the answers: a resume with other values would mix two evaluations in one file.
RUN_KEYS = ("model", "data", "format", "video_root", "durations", "nframes", "max_pixels", "min_pixels",
            "max_new_tokens", "dtype")


def run_settings(a) -> dict:
    d = {k: getattr(a, k) for k in RUN_KEYS}
    for k in ("model", "data", "video_root", "durations"):  # the same directory, however it is spelled
        if d[k] and os.path.exists(d[k]):
            d[k] = os.path.abspath(d[k])
    return d


def pick_cases(ious: list[float], n: int, seed: int = 0) -> list[tuple[int, str]]:
    """(index, why) of the samples cases.png shows: the best IoU, the worst, then random others drawn
    with a fixed seed (the same picture for the same predictions). Ties go to the earlier sample."""
    left = list(range(len(ious)))
    picked = []
    for why, pick in (("best", max), ("worst", min)):
        if left and len(picked) < n:
            i = pick(left, key=ious.__getitem__)
            picked.append((i, why))
            left.remove(i)
    k = max(0, min(n - len(picked), len(left)))
    return picked + [(i, "random") for i in sorted(random.Random(seed).sample(left, k))]


def write_cases(path: Path, samples: list, records: list[dict], a) -> None:
    """cases.png: the picked samples with existing videos, scored by the parser the metrics used, drawn
    by predict.py's timeline (the frames the model saw, at their real times)."""
    import data
    import predict  # here, not at the top: matplotlib and the plotting stay out of scoring-only use
    keep = [(s, prediction_from_dict(d, s.id)) for s, d in zip(samples, records) if os.path.isfile(s.video)]
    spans = [predicted_span(p, a.parse) for _, p in keep]
    ious = [0.0 if sp is None else reward.official_iou(sp, p.gt) for sp, (_, p) in zip(spans, keep)]
    rows = []
    for i, why in pick_cases(ious, a.cases):
        s, p = keep[i]
        frames, times, duration = predict.video_strip(data.load_video(s, a.nframes, a.max_pixels, a.min_pixels))
        rows.append(predict.Row(frames, times, duration, f'{why}, IoU {ious[i]:.2f}: "{s.query}" ({s.id})',
                                preds=[spans[i]], gt=p.gt, reasoning=predict.reasoning_of(p.response or "")))
    if rows:
        predict.plot_timeline(rows, path)


def eval_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Re-score a file: python eval.py score FILE [--parse official|strict|taro] [--json]")
    # --- model and data
    ap.add_argument("--model", required=True, help="model directory (save_pretrained) or hub id")
    ap.add_argument("--data", required=True, help="test set: a Sample JSONL, or a raw benchmark file with --format")
    ap.add_argument("--format", choices=("charades_sta", "nextgqa", "rextime"),
                    help="read --data as this benchmark's raw annotation file (data.read_benchmark)")
    ap.add_argument("--video-root", help="directory of the benchmark's videos (with --format)")
    ap.add_argument("--durations", help="JSON {video id: seconds} for benchmarks without durations (with --format)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate only the first N samples (0: all)")
    ap.add_argument("--allow-missing", action="store_true",
                    help="skip samples whose video is missing (listed, counted beside the metrics) instead of refusing")
    ap.add_argument("--out", required=True, help="output directory: predictions.jsonl, metrics.json")
    # --- video input (the paper's setting by default; the same function as training builds the inputs)
    ap.add_argument("--nframes", type=int, default=None, help="frames per video (default: data.NFRAMES = 64)")
    ap.add_argument("--max-pixels", type=int, default=None, help="max pixels per frame (default: 128*28*28)")
    ap.add_argument("--min-pixels", type=int, default=None, help="min pixels per frame (default: data.MIN_PIXELS)")
    # --- generation
    ap.add_argument("--batch-size", type=int, default=1,
                    help="queries per generate call, per rank. 1: every answer exactly as if asked alone; more: "
                         "a video's queries in the call share one prefill of their prompt and the answers are "
                         "decoded together (3.1x faster on the CPU at 5 queries a video, bench.py), but the "
                         "batched sums can flip a greedy near-tie")
    ap.add_argument("--group-videos", action=argparse.BooleanOptionalAction, default=True,
                    help="decode and encode each video once for all of its queries (the same answers); "
                         "--no-group-videos: once per query, the old way (for comparison)")
    ap.add_argument("--max-new-tokens", type=int, default=2048, help="answer length cap (the paper: 2048)")
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                    help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--workers", type=int, default=4, help="threads decoding the next batch's videos (0: inline)")
    # --- scoring
    ap.add_argument("--parse", choices=PARSERS, default="official", help=PARSE_HELP)
    ap.add_argument("--cases", type=int, default=6,
                    help="samples drawn in cases.png: the best, the worst, the rest at random (seed 0); 0: no picture")
    a = ap.parse_args(argv)

    import data
    a.nframes = a.nframes or data.NFRAMES
    a.max_pixels = a.max_pixels or data.MAX_PIXELS
    a.min_pixels = a.min_pixels or data.MIN_PIXELS
    if a.batch_size < 1 or a.max_new_tokens < 1:
        ap.error("--batch-size and --max-new-tokens must be >= 1")
    if (a.video_root or a.durations) and not a.format:
        ap.error("--video-root and --durations go with --format (a Sample JSONL carries its own video paths)")
    if a.durations and a.format != "charades_sta":
        ap.error(f"--durations is for charades_sta; {a.format} files carry their own durations")

    # Distributed: torchrun sets these; without a launcher this is one rank.
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))

    def print0(*args, **kw):
        if rank == 0:
            print(*args, **kw, flush=True)

    # --- Checks that need no model. Every rank runs them on the same files, so all ranks stop together.
    out = Path(a.out)
    samples = load_samples(a)
    missing = [s for s in samples if not os.path.isfile(s.video)]
    if missing and (not a.allow_missing or len(missing) == len(samples)):
        print0(f"error: {len(missing)} of {len(samples)} videos are missing, e.g.:", file=sys.stderr)
        for s in missing[:10]:
            print0(f"  {s.id}\t{s.video}", file=sys.stderr)
        print0("Fix --video-root (or the paths in --data)" +
               ("" if len(missing) == len(samples) else ", or pass --allow-missing to evaluate the others") + ".",
               file=sys.stderr)
        sys.exit(2)
    settings = run_settings(a)
    if (out / "eval_args.json").exists():
        old = json.loads((out / "eval_args.json").read_text(encoding="utf-8"))
        for k in RUN_KEYS:
            if old.get(k) != settings[k]:
                raise DataError(f"{out} holds answers made with {k}={old.get(k)!r}, this run has {k}={settings[k]!r}: "
                                "use another --out (or delete that directory to start over)")
    done = read_done(out)
    ids = {s.id for s in samples}
    extra = [i for i in done if i not in ids]
    if extra:
        raise DataError(f"{out} holds {len(extra)} answer(s) for samples not in {a.data} (e.g. {extra[0]!r}): "
                        "use another --out")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "eval_args.json", settings)
        if missing:
            (out / "missing_videos.txt").write_text("".join(f"{s.id}\t{s.video}\n" for s in missing), encoding="utf-8")
        elif (out / "missing_videos.txt").exists():
            (out / "missing_videos.txt").unlink()
    skip = {s.id for s in missing}
    todo = [s for s in by_video(samples, rank, world) if s.id not in done and s.id not in skip]
    how = "each video decoded and encoded once for its queries" if a.group_videos else "each query on its own"
    print0(f"{len(samples)} samples about {len({s.video for s in samples})} videos in {a.data}: "
           f"{sum(s.id in done for s in samples)} already answered in {out}, {len(missing)} missing videos skipped; "
           f"generating on {world} rank(s), {how}")

    # --- Setup: device, process group, model
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from model import load_model, load_processor
    from predict import generation_kwargs

    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        # Ranks meet only at the end: a rank can wait there for a slower one's whole shard, hence the timeout.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=12))
        from model import check_shared_dir
        check_shared_dir(str(out), device)  # rank 0 merges every rank's answers from --out: one directory for all
        dist.barrier()  # every rank has read the resume state before any rank writes
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    processor = load_processor(a.model)
    model = load_model(a.model, dtype).to(device).eval()
    # greedy, no repetition penalty: the checkpoint's sampling flags silenced (predict.py decodes alike)
    gen_kwargs = generation_kwargs(processor.tokenizer, a.max_new_tokens, temperature=0.0)

    # --- The loop: append each finished batch to this rank's file, flushed, so a kill loses one batch
    rank_file = out / f"predictions.rank{rank}.jsonl"
    _trim_partial_line(rank_file)
    bar = tqdm(total=len(todo), desc=f"eval (rank 0 of {world})", disable=rank != 0 or not todo)
    with open(rank_file, "a", encoding="utf-8") as f:
        for batch, texts in answer_batches(model, processor, todo, gen_kwargs, a.batch_size, a.group_videos,
                                           a.workers, a.nframes, a.max_pixels, a.min_pixels):
            for s, text in zip(batch, texts):
                f.write(json.dumps({"id": s.id, "source": s.source, "query": s.query, "response": text,
                                    "gt": s.spans, "duration": s.duration}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    if world > 1:
        dist.barrier()

    # --- Merge (rank 0): every answer, in the order of --data, into predictions.jsonl; then score it
    if rank == 0:
        done = read_done(out)
        records = [done[s.id] for s in samples if s.id in done]
        lost = [s.id for s in samples if s.id not in done and s.id not in skip]
        if lost:
            raise RuntimeError(f"no answer for {len(lost)} sample(s) after generation (e.g. {lost[0]!r})")
        data.write_jsonl(out / "predictions.jsonl", records)  # atomic
        for p in out.glob("predictions.rank*.jsonl"):  # merged: the rank files are redundant now
            p.unlink()
        m = score_predictions([prediction_from_dict(d, f"{out}/predictions.jsonl:{i}")
                               for i, d in enumerate(records, 1)], a.parse)
        m.update(n_total=len(samples), n_evaluated=len(records), n_skipped_missing=len(samples) - len(records),
                 **{k: settings[k] for k in RUN_KEYS})
        _write_json(out / "metrics.json", m)
        print(format_table(m))
        note = f"evaluated {len(records)} of {len(samples)} samples"
        if len(records) < len(samples):
            note += (f"; {len(samples) - len(records)} skipped for missing videos (listed in "
                     f"{out / 'missing_videos.txt'}): the metrics above are over the {len(records)} evaluated")
        print(f"{note}; parse: {a.parse}\nwrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")
        if a.cases > 0:
            write_cases(out / "cases.png", [s for s in samples if s.id in done], records, a)
            print(f"wrote {out / 'cases.png'}")
    if world > 1:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["score"]:
            score_main(argv[1:])
        elif argv[:1] == ["baseline"]:
            baseline_main(argv[1:])
        else:
            eval_main(argv)
    except DataError as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
