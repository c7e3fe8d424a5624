r"""Data for every stage: the Sample record, the paper's prompt, video -> model inputs, benchmark
readers and a synthetic benchmark with known events.

    python data.py synth   --out data/synth --train 400 --test 100 --seed 0
    python data.py convert --format charades_sta --input assets/charades_sta/charades_sta_test.txt \
                           --video-root /data/charades/videos --out charades_test.jsonl
    python data.py convert --format nextgqa --input assets/nextgqa/test.csv --out nextgqa_test.jsonl
    python data.py convert --format rextime --input assets/rextime/rextime_val.jsonl --out rextime_val.jsonl
    python data.py convert --format tvg_r1  --input TVG_RL_18K.json --video-root /data/videomind --out rl.jsonl
    python data.py convert --format tvg_r1  --input TVG_ColdStart.json --video-root /data/videomind \
                           --require-cot [--cot-field NAME] --out coldstart.jsonl

One record type flows through the whole pipeline: a `Sample`, stored one per line as JSONL. Times are
seconds; spans are `[start, end]` floats.

The one function that turns Samples into model inputs is `build_inputs`. SFT, GRPO and eval all call
it, so the video reaches the model the same way in training, rollouts and evaluation. It fixes the
time-encoding bug of several peer recipes: Qwen2.5-VL places video tokens in time through
`second_per_grid_ts`, and unless the processor is given the real sampling metadata it assumes 24 fps
(or 2 fps in older code) and every video longer than a few seconds gets wrong temporal positions.
"""
from __future__ import annotations

import argparse
import codecs
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

# qwen-vl-utils picks its video reader at import time: decord is the reader we pin and test.
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")

# -----------------------------------------------------------------------------
# The paper's prompt, word for word (SPEC.md). The answer tag lives in reward.py's ANSWER_TAG.

SYSTEM_PROMPT = (
    "You MUST reason based on the temporal changes and visual evidence in the video to determine the "
    "precise time period related to the query. The reasoning MUST reflect how the content evolves over "
    "time, not general logic. The reasoning process MUST BE enclosed within <think> </think> tags. The "
    "specific time period MUST BE in the format [start time, end time] in seconds enclosed within "
    "<time> </time> tags."
)

# The paper's video setting for training and inference: 64 frames, each at most 128*28*28 pixels.
NFRAMES = 64
MAX_PIXELS = 128 * 28 * 28
MIN_PIXELS = 4 * 28 * 28
# The longest query a Sample may hold. The three benchmarks' longest is 142 characters; a query of
# 100,000 would become a prompt of tens of thousands of tokens (a data error, not a question).
MAX_QUERY_CHARS = 2000

# -----------------------------------------------------------------------------
# The record


@dataclass
class Sample:
    id: str
    video: str  # path to the video file (absolute, or relative to the JSONL's directory)
    duration: float | None  # seconds; None when unknown (e.g. Charades-STA txt without videos or durations)
    query: str
    spans: list[list[float]]  # ground truth, one or more [start, end] in seconds
    source: str = ""
    captions: list[dict] | None = None  # dense captions [{start, end, text}], optional
    cot: str | None = None  # teacher's reasoning (cold-start SFT target), optional
    answer: list[float] | None = None  # teacher's span that goes with `cot`, optional

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(d, ensure_ascii=False)


class DataError(ValueError):
    """Bad input, with the file and line (or sample id) that is wrong in the message."""


def _check_span(span, where: str) -> list[float]:
    if not (isinstance(span, (list, tuple)) and len(span) == 2):
        raise DataError(f"{where}: a span must be [start, end], got {span!r}")
    # Numbers only: "12.5" would read, but a file that writes times as strings may write "1:05" next.
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in span):
        raise DataError(f"{where}: span times must be numbers, got {span!r}")
    s, e = float(span[0]), float(span[1])
    if not (math.isfinite(s) and math.isfinite(e)):
        raise DataError(f"{where}: span times must be finite, got {span!r}")
    if s > e:  # no IoU could ever be above 0
        raise DataError(f"{where}: span [{s}, {e}] starts after it ends")
    return [s, e]


def sample_from_dict(d: dict, where: str) -> Sample:
    """Validate one JSON object into a Sample; `where` is e.g. 'train.jsonl:12' for the error message."""
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in ("id", "video", "query", "spans") if k not in d]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = set(d) - set(Sample.__dataclass_fields__)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    duration = d.get("duration")
    if duration is not None:
        try:
            duration = float(duration)
        except (TypeError, ValueError):
            raise DataError(f"{where}: duration must be a number, got {d['duration']!r}") from None
        if not (math.isfinite(duration) and duration > 0):
            raise DataError(f"{where}: duration must be positive, got {d['duration']!r}")
    query = d["query"]
    if not isinstance(query, str) or not query.strip():
        raise DataError(f"{where}: the query must be non-empty text, got {query!r}")
    if len(query) > MAX_QUERY_CHARS:
        raise DataError(f"{where}: the query is {len(query):,} characters long, more than the "
                        f"{MAX_QUERY_CHARS:,} a query may have (data.MAX_QUERY_CHARS)")
    spans = d["spans"]
    if not isinstance(spans, list) or not spans:
        raise DataError(f"{where}: spans must be a non-empty list of [start, end], got {spans!r}")
    if not isinstance(spans[0], (list, tuple)):  # a single span written flat: [s, e]
        spans = [spans]
    # A span that starts after the video ends is found when the video is opened (check_video), so that
    # `prepare.py check --drop-bad` can leave such samples out instead of refusing the whole file.
    d = dict(d, id=str(d["id"]), duration=duration, spans=[_check_span(s, where) for s in spans])
    if d.get("answer") is not None:
        d["answer"] = _check_span(d["answer"], where)
    return Sample(**d)


# Every reader goes through the next functions, so a UTF-8 BOM, CRLF line ends, bytes that are
# not UTF-8 and a last line torn by a kill are handled, and named, the same way in every stage.


def file_lines(path: str | Path, complete_only: bool = False) -> Iterator[tuple[str, bytes]]:
    """(where 'FILE:LINE', the line's bytes without its line end) of each non-blank line of a text file.
    A UTF-8 BOM before the first line is dropped and CRLF reads as LF. complete_only: a last line
    without its newline is left out (an append-only log that a kill -9 cut in the middle of a write)."""
    raw = Path(path).read_bytes()
    lines = raw.removeprefix(codecs.BOM_UTF8).split(b"\n")
    if complete_only:
        lines = lines[:-1]  # what follows the last newline: nothing, or a torn line
    for i, line in enumerate(lines, 1):
        if line.strip():
            yield f"{path}:{i}", line.removesuffix(b"\r")


def text_line(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None


def json_line(line: bytes, where: str):
    """One line of a JSONL file, parsed. Bytes that are not UTF-8 and bad JSON raise naming `where`."""
    try:
        return json.loads(text_line(line, where))
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def json_lines(path: str | Path, complete_only: bool = False) -> Iterator[tuple[str, object]]:
    """(where, parsed JSON) of each non-blank line of a JSONL file (see file_lines)."""
    for where, line in file_lines(path, complete_only):
        yield where, json_line(line, where)


def drop_torn_tail(path: str | Path) -> int:
    """Cut an append-only log after its last newline, so the next append starts a line of its own.
    Returns the bytes dropped: a line a kill -9 tore mid-write (its work is redone)."""
    if not os.path.exists(path):
        return 0
    raw = Path(path).read_bytes()
    cut = raw.rfind(b"\n") + 1
    if cut < len(raw):
        os.truncate(path, cut)
    return len(raw) - cut


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (a JSON list, a CSV), its BOM dropped; bytes that are not UTF-8 raise
    naming the line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def read_jsonl(path: str | Path) -> list[Sample]:
    """Read Samples; a relative video path is resolved against the JSONL's directory. Sample ids must
    be unique: every stage keys its resume state (annotations, predictions) by id."""
    path = Path(path)
    out, seen = [], {}
    for where, d in json_lines(path):
        s = sample_from_dict(d, where)
        if s.id in seen:
            raise DataError(f"{where}: duplicate sample id {s.id!r} (first at {seen[s.id]})")
        seen[s.id] = where
        if not os.path.isabs(s.video):
            s.video = str((path.parent / s.video).resolve())
        out.append(s)
    return out


def write_jsonl(path: str | Path, samples) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write((s.to_json() if isinstance(s, Sample) else json.dumps(s, ensure_ascii=False)) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Prompt and model inputs


def format_answer(cot: str, span) -> str:
    """The assistant text SFT trains on and GRPO rewards: `<think>...</think> <time>[s, e]</time>`."""
    return f"<think>{cot.strip()}</think> <time>[{float(span[0]):.2f}, {float(span[1]):.2f}]</time>"


def build_messages(sample: Sample, nframes: int = NFRAMES, max_pixels: int = MAX_PIXELS,
                   min_pixels: int = MIN_PIXELS, answer: str | None = None) -> list[dict]:
    """The chat for one Sample: system prompt, then the video, then the query (the paper's order).
    With `answer`, the assistant turn is appended (SFT targets)."""
    video = {"type": "video", "video": sample.video, "nframes": nframes,
             "max_pixels": max_pixels, "min_pixels": min(min_pixels, max_pixels)}
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [video, {"type": "text", "text": sample.query}]},
    ]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def _even_floor(n: int) -> int:
    return max(2, n - n % 2)


# Durations in the benchmarks' files are rounded (NExT-GQA's to whole seconds), so a decoded video may end
# a little before a span that starts near its end; more than this is a video too short for its span.
SPAN_PAST_VIDEO_SECONDS = 1.0


def check_video(sample: Sample) -> int:
    """The number of frames of a Sample's video, after checking it opens (not a zero-byte, truncated or
    audio-only file), has 2 frames or more, and lasts until each ground-truth span starts, by the
    sample's duration and by the file. Opening reads the container's index only, no frame is decoded.
    Raises a DataError naming the sample. (Span ends a little past the video are common, annotators
    round up: Charades-STA has 551; the reward clamps them. A span that starts after the end can never
    be hit.)"""
    import decord
    path = sample.video
    if not os.path.isfile(path):
        raise DataError(f"sample {sample.id}: video not found: {path}")
    try:  # qwen-vl-utils swallows decord errors and retries with torchvision: check readability here
        vr = decord.VideoReader(path)
        total, fps = len(vr), vr.get_avg_fps()
    except Exception as e:  # decord raises its own DECORDError for corrupt files
        raise DataError(f"sample {sample.id}: cannot decode video {path}: {str(e).strip()[:300]}") from None
    if total < 2:
        raise DataError(f"sample {sample.id}: video {path} has {total} frame(s); need at least 2")
    check_spans(sample, total / fps)
    return total


def check_spans(sample: Sample, seconds: float) -> None:
    """Raises a DataError naming the sample when a ground-truth span starts after the video's end, by the
    sample's duration or by the file's length in `seconds` (beyond SPAN_PAST_VIDEO_SECONDS)."""
    path = sample.video
    for s, e in sample.spans:
        if sample.duration is not None and s >= sample.duration:
            raise DataError(f"sample {sample.id}: the span [{s}, {e}] starts at {s:.2f} s, but the video is "
                            f"{sample.duration:.2f} s long (the sample's duration)")
        if s > seconds + SPAN_PAST_VIDEO_SECONDS:
            raise DataError(f"sample {sample.id}: the span [{s}, {e}] starts at {s:.2f} s, but the video {path} "
                            f"is {seconds:.2f} s long (shorter than the annotation says)")


def load_video(sample: Sample, nframes: int = NFRAMES, max_pixels: int = MAX_PIXELS,
               min_pixels: int = MIN_PIXELS):
    """Decode and resize one Sample's video ONCE: returns (frames (T, C, H, W) float, metadata).
    GRPO reuses the result for all G rollouts of a prompt; eval and SFT call it once per sample.

    The metadata (source fps, sampled frame indices) is what makes the time encoding right: the
    processor derives `second_per_grid_ts` = temporal_patch_size / sampled_fps from it."""
    from qwen_vl_utils import fetch_video

    total = check_video(sample)
    # A clip shorter than the frame budget is sampled at every frame (qwen-vl-utils would raise); the
    # metadata still holds each frame's real time, so the time encoding stays right.
    ele = build_messages(sample, min(nframes, _even_floor(total)), max_pixels, min_pixels)[1]["content"][0]
    try:
        frames, meta = fetch_video(ele, return_video_metadata=True)
    except Exception as e:  # its index opens but its frames do not decode (a damaged stream); qwen-vl-utils
        # then falls back to torchvision, whose error (e) says little about the file
        raise DataError(f"sample {sample.id}: cannot decode the frames of video {sample.video} (a damaged stream? "
                        f"{type(e).__name__}: {str(e)[:300]})") from None
    return frames, meta


def load_video_cached(sample: Sample, cache: dict | None, nframes: int = NFRAMES, max_pixels: int = MAX_PIXELS,
                      min_pixels: int = MIN_PIXELS) -> tuple:
    """`load_video`, decoded once per video when `cache` is a dict (video path -> frames, metadata; the
    training scripts' --cache-videos). Frames are integer-valued floats (qwen-vl-utils resizes uint8),
    so the uint8 copy kept is exact and 4x smaller."""
    import torch

    if cache is not None and sample.video in cache:
        frames, meta = cache[sample.video]
        return frames.float(), meta
    frames, meta = load_video(sample, nframes, max_pixels, min_pixels)
    if cache is not None:
        small = frames.to(torch.uint8)
        cache[sample.video] = (small if torch.equal(small.float(), frames) else frames, meta)
    return frames, meta


def chat_text(processor, sample: Sample, nframes: int = NFRAMES, max_pixels: int = MAX_PIXELS,
              min_pixels: int = MIN_PIXELS, answer: str | None = None) -> str:
    """The chat template's text for one Sample, the video a single placeholder: a generation prompt, or
    with `answer` the whole SFT conversation."""
    return processor.apply_chat_template(build_messages(sample, nframes, max_pixels, min_pixels, answer),
                                         tokenize=False, add_generation_prompt=answer is None)


def build_inputs(processor, samples: list[Sample], videos: list | None = None, answers: list[str] | None = None,
                 nframes: int = NFRAMES, max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS,
                 padding_side: str = "left"):
    """Samples -> one padded batch of model inputs (input_ids, attention_mask, pixel_values_videos,
    video_grid_thw, second_per_grid_ts, mm_token_type_ids). Every stage uses this function.

    `videos`: the (frames, metadata) pairs from `load_video`, to decode each video once and reuse it;
    decoded here when None. `answers`: assistant texts appended for SFT (no generation prompt then).
    `padding_side`: left for generation (new tokens line up at the end), right for training."""
    if videos is None:
        videos = [load_video(s, nframes, max_pixels, min_pixels) for s in samples]
    texts = [chat_text(processor, s, nframes, max_pixels, min_pixels, None if answers is None else answers[i])
             for i, s in enumerate(samples)]
    processor.tokenizer.padding_side = padding_side
    # do_sample_frames=False / do_resize=False: frames are already sampled and resized by qwen-vl-utils.
    # video_metadata is the part peers forget: without it the processor assumes 24 fps.
    return processor(text=texts, videos=[v for v, _ in videos], video_metadata=[m for _, m in videos],
                     do_sample_frames=False, do_resize=False, cap_pixels_per_frame=True, padding=True,
                     return_tensors="pt")


def prompt_ids(processor, samples: list[Sample], n_video_tokens: int, nframes: int = NFRAMES,
               max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS) -> list:
    """The generation prompts' token ids (unpadded, one 1-D tensor each) of samples whose video has
    n_video_tokens tokens, without processing the video: what `build_inputs` tokenizes (the processor
    writes the video placeholder n times, then tokenizes), for several queries about one video that
    has gone through the processor once."""
    import torch
    return [torch.tensor(processor.tokenizer(_expanded_text(processor, s, n_video_tokens, None, nframes, max_pixels,
                                                            min_pixels))["input_ids"], dtype=torch.long)
            for s in samples]


def _expanded_text(processor, sample: Sample, n_video_tokens: int, answer: str | None, nframes: int, max_pixels: int,
                   min_pixels: int) -> str:
    """chat_text with its one video placeholder written n_video_tokens times, as the processor writes it."""
    text = chat_text(processor, sample, nframes, max_pixels, min_pixels, answer)
    if text.count(processor.video_token) != 1:
        raise ValueError(f"sample {sample.id}: the prompt holds {text.count(processor.video_token)} video "
                         f"placeholders, not 1")
    return text.replace(processor.video_token, processor.video_token * n_video_tokens)


def build_text_inputs(processor, samples: list[Sample], grids: list, seconds: list[float],
                      answers: list[str] | None = None, nframes: int = NFRAMES, max_pixels: int = MAX_PIXELS,
                      min_pixels: int = MIN_PIXELS, padding_side: str = "left"):
    """`build_inputs` without the video's pixels, for videos that went through the processor before:
    each sample's video grid (t, h, w) and seconds per temporal patch (the processor's video_grid_thw
    and second_per_grid_ts rows) replace its frames. The same batch as build_inputs but
    pixel_values_videos (tests/test_data.py checks it), at ~40% of its cost; the model then takes
    the video's encoder output instead of pixels (sft.py's cache of the frozen vision tower)."""
    import math

    import torch
    from transformers import BatchFeature

    tok, merge = processor.tokenizer, processor.video_processor.merge_size
    texts = [_expanded_text(processor, s, math.prod(int(x) for x in grids[i]) // merge ** 2,
                            None if answers is None else answers[i], nframes, max_pixels, min_pixels)
             for i, s in enumerate(samples)]
    tok.padding_side = padding_side
    enc = tok(texts, padding=True, return_tensors="pt")
    return BatchFeature(dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             mm_token_type_ids=torch.tensor(processor.create_mm_token_type_ids(enc["input_ids"].tolist())),
                             video_grid_thw=torch.tensor([[int(x) for x in g] for g in grids]),
                             second_per_grid_ts=torch.tensor(seconds, dtype=torch.float32)))


# -----------------------------------------------------------------------------
# TaRO (grpo.py --taro): the shuffled video of the temporal-sensitivity reward and the guided prefix.
# Released code: github oceanflowlab/TaRO @ 143a234, src/utils.py.


def frame_times(meta: dict) -> list[float]:
    """The second of each frame `load_video` returned. qwen-vl-utils' metadata holds the source fps and
    the sampled frames' indices in the source file, so frame k is at frames_indices[k] / fps. (TaRO
    subtracts the first index because its clips can start at `video_start`; our spans count from the
    start of the file, as the indices do.)"""
    fps = float(meta["fps"])
    return [float(i) / fps for i in meta["frames_indices"]]


def shuffle_boundary_frames(frames, times, span, radius: float, generator):
    """TaRO's perturbed video V': the frames near the GT start permuted among themselves, and likewise
    the frames near the GT end, each window on its own (a new tensor; `frames` is not modified).

    frames: (T, C, H, W); times: (T,) seconds of each frame (`frame_times`), a list or a tensor;
    span: the GT [start, end]; radius: seconds (TaRO's scripts: 3). A frame is in a window when
    |t - boundary| <= radius (inclusive, as TaRO's). When the two windows overlap, a shared frame
    belongs to the start window only, so each frame moves at most once; TaRO permutes the start window
    and then the end window in place, so a shared frame can move twice. A window of fewer than 2 frames
    is left as is. The permutation is torch.randperm on `generator` (a seeded torch.Generator gives the
    same V' every time) and may leave some frames in place, as TaRO's does.

    The frames are permuted one by one, before Qwen2.5-VL merges each 2 consecutive frames into one
    temporal patch, as TaRO does: a swap inside a patch changes what the patch sees, a swap across
    patches moves content to another time position."""
    import torch

    start, end = float(span[0]), float(span[1])
    t = [float(x) for x in times]
    near_start = [k for k, x in enumerate(t) if abs(x - start) <= radius]
    near_end = [k for k, x in enumerate(t) if abs(x - end) <= radius and abs(x - start) > radius]
    out = frames.clone()
    for window in (near_start, near_end):
        if len(window) >= 2:
            idx = torch.tensor(window)
            out[idx] = frames[idx[torch.randperm(len(idx), generator=generator)]]
    return out


def caption_sentence(text: str, start: float, end: float) -> str:
    """One dense caption as a sentence of the captions teacher (annotate.caption_answer), e.g.
    'A circle in blue moves across the screen from 6.25 s to 9.50 s.'"""
    text = str(text).strip().rstrip(".")
    return f"{text[:1].upper() + text[1:]} from {float(start):.2f} s to {float(end):.2f} s."


def guided_prefix(query: str, captions: list[dict] | None, generator) -> str | None:
    """TaRO's guided reasoning (constructive reasoning exploration): a start of the answer the policy
    continues from, built from the dense captions without the ground truth:

        <think>\\nI need to find the specific moment {query}.\\n{caption}\\n{caption}...

    k of the n captions, k uniform in 1..n, drawn without replacement and kept in time order, one
    sentence a line. None without captions (the rollout is then unguided, as in TaRO).

    Where it differs from TaRO's released `sample_reasoning`: their captions are ready-made strings
    from their training file (not in the released repository; the example in their prompt writes
    "From 0.0s to 5.2s, a person is ..."), taken in file order, drawn with Python's global `random`.
    Ours are {start, end, text} records, sorted by time here, each written as the captions teacher
    writes it (`caption_sentence`), so a model SFT-trained on that teacher continues in its own words;
    the random numbers come from a torch.Generator. The query is inserted as is, like theirs, but the
    '.' after it is left out when it already ends in '.', '?' or '!'."""
    import torch

    if not captions:
        return None
    caps = sorted(captions, key=lambda c: (float(c["start"]), float(c["end"])))
    k = int(torch.randint(1, len(caps) + 1, (1,), generator=generator))
    chosen = sorted(torch.randperm(len(caps), generator=generator)[:k].tolist())
    q = query.strip()
    head = f"<think>\nI need to find the specific moment {q}{'' if q.endswith(('.', '?', '!')) else '.'}\n"
    return head + "\n".join(caption_sentence(caps[i]["text"], caps[i]["start"], caps[i]["end"]) for i in chosen)


# -----------------------------------------------------------------------------
# Synthetic benchmark: real mp4 files with coloured shapes shown in known windows.
# Each video has several events; every event has its own colour, so the query ("the red circle")
# names exactly one event and the others are distractors the model must not pick.

# Five colours far apart in RGB: a tiny vision tower trained from scratch tells them apart quickly (with
# eight, red/orange/magenta and white/yellow were confused and the model bound queries to the wrong shape).
SYNTH_COLORS = {"red": (230, 30, 30), "green": (30, 210, 50), "blue": (40, 70, 250), "yellow": (245, 230, 30),
                "white": (250, 250, 250)}
SYNTH_SHAPES = ["square", "circle", "triangle", "bar"]
SYNTH_TEMPLATES = ["when does the {c} {s} appear?", "the {c} {s} is visible", "{a} {c} {s} moves across the screen",
                   "find the moment the {c} {s} is shown"]
SYNTH_FPS = 4  # frames per second of the written mp4 files; event times are multiples of 1/SYNTH_FPS
SYNTH_SIZE = 112  # pixels (square)
# Shape half-size in pixels: a shape spans most of a 56x56 frame, so it shows in all four of a frame's
# video tokens. Why so large: the language model must first learn to find the event among the video
# tokens, and a needle in 1 of 4 tokens (radius 18) was not found in a CPU budget (measured on
# one-event videos with the query's colour word removed: colour read at chance after 300 SFT steps with
# radius 18, 95-100% after 250 steps with radius 36).
SYNTH_RADIUS = 36.0


def synth_query(color: str, shape: str, template: int = 0) -> str:
    return SYNTH_TEMPLATES[template % len(SYNTH_TEMPLATES)].format(a=_article(color), c=color, s=shape)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def synth_caption(color: str, shape: str) -> str:
    # The colour last: it is the word that tells a video's events apart (each colour appears once per
    # video, shapes repeat), and the captions teacher marks the chosen event right after that word.
    return f"a {shape} in {color} moves across the screen"


def synth_vocabulary() -> list[str]:
    """Example strings of the synthetic task, for training the tiny tokenizer."""
    out = []
    for c in SYNTH_COLORS:
        for s in SYNTH_SHAPES:
            out += [synth_query(c, s, t) for t in range(len(SYNTH_TEMPLATES))] + [synth_caption(c, s)]
    return out


def _shape_mask(shape: str, cx: float, cy: float, r: float, yy, xx):
    import numpy as np
    if shape == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "triangle":  # apex up
        return (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
    return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r / 3)  # bar


def synth_video(path: str, duration_frames: int, events: list[dict], seed: int) -> None:
    """Write one mp4: dark background, each event's shape drawn on frames i with start <= i/fps < end,
    moving in a straight line across its window."""
    import av
    import numpy as np
    from fractions import Fraction
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SYNTH_SIZE, 0:SYNTH_SIZE].astype(np.float32)
    bg = np.full((SYNTH_SIZE, SYNTH_SIZE, 3), 30, np.uint8)
    lo, hi = SYNTH_RADIUS + 2, SYNTH_SIZE - SYNTH_RADIUS - 2
    paths = [(rng.uniform(lo, hi, 2), rng.uniform(lo, hi, 2)) for _ in events]
    tmp = path + ".tmp.mp4"
    with av.open(tmp, "w") as out:
        st = out.add_stream("libx264", rate=Fraction(SYNTH_FPS))
        st.width = st.height = SYNTH_SIZE
        st.pix_fmt = "yuv420p"
        st.options = {"crf": "18", "preset": "veryfast"}
        for i in range(duration_frames):
            t = i / SYNTH_FPS
            img = bg.copy()
            for ev, (p0, p1) in zip(events, paths):
                if ev["start"] <= t < ev["end"]:
                    a = (t - ev["start"]) / max(ev["end"] - ev["start"], 1e-6)
                    cx, cy = p0 + a * (p1 - p0)
                    img[_shape_mask(ev["shape"], cx, cy, SYNTH_RADIUS, yy, xx)] = SYNTH_COLORS[ev["color"]]
            for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    os.replace(tmp, path)


def synth_one(idx: int, seed: int, out_dir: Path, n_events: int = 3) -> list[Sample]:
    """One video and one Sample per event (every event is a query; the others are its distractors)."""
    import numpy as np
    rng = np.random.default_rng([seed, idx])
    n = int(rng.integers(8 * SYNTH_FPS, 40 * SYNTH_FPS + 1))  # 8-40 s, in frames
    # Event lengths 12-30% of the video, placed in order with random gaps: each in its own window.
    lens = (rng.uniform(0.12, 0.30, n_events) * n).astype(int).clip(3)
    gaps = rng.dirichlet(np.ones(n_events + 1)) * (n - lens.sum())
    colors = rng.choice(list(SYNTH_COLORS), n_events, replace=False)
    shapes = rng.choice(SYNTH_SHAPES, n_events)
    events, t = [], 0.0
    for k in rng.permutation(n_events):
        t += gaps[len(events)]
        s = int(round(t))
        events.append({"start": s / SYNTH_FPS, "end": (s + int(lens[k])) / SYNTH_FPS,
                       "color": str(colors[k]), "shape": str(shapes[k])})
        t = s + lens[k]
    vid = f"synth{idx:05d}"
    video_seed = int(rng.integers(1 << 31))  # drawn even when the file exists, so the stream stays the same
    if not (out_dir / "videos" / f"{vid}.mp4").exists():
        synth_video(str(out_dir / "videos" / f"{vid}.mp4"), n, events, seed=video_seed)
    captions = [{"start": e["start"], "end": e["end"], "text": synth_caption(e["color"], e["shape"])} for e in events]
    return [Sample(id=f"{vid}_{k}", video=f"videos/{vid}.mp4", duration=n / SYNTH_FPS,
                   query=synth_query(e["color"], e["shape"], int(rng.integers(len(SYNTH_TEMPLATES)))),
                   spans=[[e["start"], e["end"]]], source="synth", captions=captions)
            for k, e in enumerate(events)]


def synth(out: str, n_train: int, n_test: int, seed: int = 0, events: int = 3, workers: int = 1) -> None:
    """Write OUT/videos/*.mp4, OUT/train.jsonl and OUT/test.jsonl (n_* counts videos; each video
    gives one Sample per event). Train and test use disjoint videos. Finished videos are reused, so an
    interrupted run continues. `workers` processes encode videos in parallel (video i depends only on
    (seed, i), so the output is the same for any number of workers)."""
    import functools
    import multiprocessing
    from tqdm import tqdm
    out_dir = Path(out)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    one = functools.partial(synth_one, seed=seed, out_dir=out_dir, n_events=events)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for split, lo, hi in (("train", 0, n_train), ("test", n_train, n_train + n_test)):
            it = pool.imap(one, range(lo, hi), chunksize=8) if pool else map(one, range(lo, hi))
            samples = [s for video in tqdm(it, total=hi - lo, desc=f"synth {split}", leave=False) for s in video]
            write_jsonl(out_dir / f"{split}.jsonl", samples)
            print(f"wrote {len(samples)} samples ({hi - lo} videos) to {out_dir / f'{split}.jsonl'}")
    finally:
        if pool:
            pool.close()
            pool.join()


# -----------------------------------------------------------------------------
# Readers for the real benchmark files (assets/) and the released TVG-R1 training JSON.
# (section owned by the readers work; see tests/test_data_readers.py)
#
# Each reader turns one benchmark file into Samples, validating every record: a bad record raises
# DataError naming the file, the line (or JSON record index) and what is wrong; nothing is skipped.
# GT spans are kept exactly as read (not clipped to the video, not swapped): the official scorers
# (VideoMind, which the paper used) read them that way, so our numbers stay comparable. The only span
# we refuse is a reversed one (start > end). Zero-length spans (2 in ReXTime) and a start below 0
# (NExT-GQA has -0.2) are kept.
#
# Video paths: with a video root they are absolute (root resolved), so a converted JSONL works from
# any directory; without one they stay relative, and `read_jsonl` resolves them against the JSONL's
# own directory (so put the videos next to the converted file, or pass --video-root).

BENCHMARK_FORMATS = ("charades_sta", "nextgqa", "rextime", "tvg_r1")


def _video_path(video_root: str | Path | None, rel: str) -> str:
    return str(Path(video_root).resolve() / rel) if video_root else rel


# Directories a released path may name that `prepare.py videos` lays out differently (first match wins):
# by default it downloads VideoMind-Dataset's 3 fps re-encodes (480p, the same seconds) instead of the
# originals, and takes the 16K query-grounding videos (ActivityNet and QVHighlights clips, which
# Grounded-VideoLLM ships again as ~255 GB of zip chunks) from the 3 fps sets the benchmarks need anyway.
VIDEO_DIR_ALIASES = [
    ("videos", "videos_3fps_480_noaudio"),
    ("GroundedVLLM/activitynet", "activitynet/videos_3fps_480_noaudio"),
    ("GroundedVLLM/qvhighlights", "qvhighlights/videos_3fps_480_noaudio"),
]


def resolve_video(path: str, video_root: str | Path | None) -> str:
    """Where a released record's video is on this machine. TVG-R1's files may hold paths relative to a
    data folder (`didemo/videos/x.mp4`) or the authors' own absolute ones
    (`/opt/tiger/video-r1/data/didemo/videos/x.mp4`). Tried in order, the first file that exists wins:

    1. the path itself when absolute, then `video_root / path`;
    2. `video_root / tail` for each shorter tail of the path (`data/didemo/videos/x.mp4`, then
       `didemo/videos/x.mp4`, ...): the longest tail that exists, so a same-named file of another
       source never wins over the right one;
    3. the same tails with a directory of VIDEO_DIR_ALIASES swapped in (and `.mp4`, the re-encodes'
       extension).

    When nothing exists: `video_root / path` (absolute, as before), which the callers report as missing."""
    if not video_root:
        return path
    root = Path(video_root).resolve()
    if os.path.isabs(path) and os.path.isfile(path):
        return path
    parts = [p for p in Path(path).parts if p not in ("/", ".", "")]
    for i in range(len(parts)):
        tail = "/".join(parts[i:])
        if (root / tail).is_file():
            return str(root / tail)
    for i in range(len(parts)):
        tail = "/" + "/".join(parts[i:-1]) + "/"
        for old, new in VIDEO_DIR_ALIASES:
            if f"/{old}/" in tail:
                cand = root / (tail.replace(f"/{old}/", f"/{new}/", 1).strip("/") + "/" + Path(parts[-1]).stem + ".mp4")
                if cand.is_file():
                    return str(cand)
    return str(root / path.lstrip("/"))


def _video_duration(path: str, cache: dict) -> float | None:
    """Seconds from the video file itself (frames / average fps); None when there is no such file.
    Cached per path: Charades-STA has ~3 queries per video."""
    if path not in cache:
        cache[path] = None
        if os.path.isfile(path):
            import decord
            try:
                vr = decord.VideoReader(path)
                cache[path] = len(vr) / vr.get_avg_fps()
            except Exception as e:  # decord raises its own DECORDError for corrupt files
                raise DataError(f"cannot read the duration of video {path}: {e}") from None
    return cache[path]


def _load_durations(durations: str | Path | dict | None) -> dict[str, float]:
    """A `{video id: seconds}` JSON file (VideoMind's durations.json) or the dict itself."""
    if durations is None:
        return {}
    where = "durations"
    if not isinstance(durations, dict):
        where = str(durations)
        durations = _read_json(Path(durations))
        if not isinstance(durations, dict):
            raise DataError(f"{where}: expected a JSON object {{video id: seconds}}, got {type(durations).__name__}")
    out = {}
    for k, v in durations.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise DataError(f"{where}: the duration of {k!r} must be a number of seconds, got {v!r}") from None
    return out


def _read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _first_char(path: Path) -> str:
    """The first non-blank character: '[' for a JSON list, '{' for JSONL, anything else for text."""
    return next((line.lstrip()[:1].decode("utf-8", "replace") for _, line in file_lines(path)), "")


def _json_records(path: Path):
    """Yield (where, object) for each record of a JSON-list file or a JSONL file (told apart by the
    first character); `where` is 'FILE: record I' or 'FILE:LINE' for error messages."""
    if _first_char(path) == "[":
        for i, d in enumerate(_read_json(path)):
            where = f"{path}: record {i}"
            if not isinstance(d, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
            yield where, d
        return
    for where, d in json_lines(path):
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
        yield where, d


def _field(d: dict, key: str, where: str):
    if key not in d:
        raise DataError(f"{where}: missing key {key!r} (keys: {', '.join(sorted(d)) or 'none'})")
    return d[key]


def _add(out: list[Sample], seen: dict[str, str], where: str, **fields) -> None:
    """Validate one record (sample_from_dict's checks + unique id), append it with its query stripped."""
    s = sample_from_dict(fields, where)
    s.query = s.query.strip()
    if s.id in seen:
        raise DataError(f"{where}: duplicate sample id {s.id!r} (first seen at {seen[s.id]})")
    seen[s.id] = where
    out.append(s)


def _nonempty(out: list[Sample], path: Path) -> list[Sample]:
    if not out:
        raise DataError(f"{path}: no samples in the file")
    return out


def read_charades_sta(path: str | Path, video_root: str | Path | None = None,
                      durations: str | Path | dict | None = None) -> list[Sample]:
    """Charades-STA, in either of its two public forms (told apart by a `.jsonl` suffix or a first
    character `{`/`[`):

    * the original TALL text, one `VID START END##sentence` per line (what VideoMind and TVG-R1 read).
      id = `charades_{i}` with i the 0-based record index (the same numbering as TaRO's `test{i}`).
    * TaRO's JSONL (`qid`, `query`, `duration`, `vid`, `relevant_windows`, `video_file`); id = `qid`.
      Note its ends are clipped to the duration and 7 queries are truncated (SOURCES.md).

    Duration: the JSONL's `duration`, else `durations` (a `{vid: seconds}` JSON file or dict, e.g.
    VideoMind's durations.json), else the video file under `video_root` (frames / fps), else None.
    Video: `{video_root}/{VID}.mp4` (the JSONL's `video_file` when given). GT spans unclipped."""
    path = Path(path)
    dur = _load_durations(durations)
    cache: dict = {}
    out: list[Sample] = []
    seen: dict[str, str] = {}
    if path.suffix == ".jsonl" or _first_char(path) in ("{", "["):
        records = _json_records(path)
    else:
        records = _charades_text_records(path)
    for where, d in records:
        vid = str(_field(d, "vid", where))
        video = _video_path(video_root, d.get("video_file") or f"{vid}.mp4")
        duration = d.get("duration")
        if duration is None:
            duration = dur.get(vid)
        if duration is None and video_root:
            duration = _video_duration(video, cache)
        _add(out, seen, where, id=str(d.get("qid", f"charades_{len(out)}")), video=video, duration=duration,
             query=_field(d, "query", where), spans=_field(d, "relevant_windows", where), source="charades_sta")
    return _nonempty(out, path)


def _charades_text_records(path: Path):
    """The TALL text form as (where, dict in the JSONL form's keys)."""
    for where, raw in file_lines(path):
        line = text_line(raw, where)
        left, sep, sentence = line.partition("##")
        parts = left.split()
        if not sep or len(parts) != 3 or not sentence.strip():
            raise DataError(f"{where}: expected 'VID START END##sentence', got {line.strip()[:100]!r}")
        vid, s, e = parts
        try:
            span = [float(s), float(e)]
        except ValueError:
            raise DataError(f"{where}: START and END must be seconds, got {s!r} and {e!r}") from None
        yield where, {"vid": vid, "query": sentence, "relevant_windows": [span]}


def read_nextgqa(csv_path: str | Path, video_root: str | Path | None = None) -> list[Sample]:
    """NExT-GQA grounding: `test.csv` (one question per row) plus, read from beside it,
    `gsub_test.json` (spans and duration per video and qid; `gsub_{stem}.json` for another split)
    and `map_vid_vidorID.json` (video id -> `0101/2909445186`).

    Query = the question, spans = ALL GT spans of the question (591 test questions have several,
    up to 16; official_iou takes the best), duration = gsub's duration (integer seconds),
    video = `{video_root}/{mapped id}.mp4` (VideoMind's layout), id = `{video_id}_{qid}`."""
    csv_path = Path(csv_path)
    gsub_path = csv_path.with_name(f"gsub_{csv_path.stem}.json")
    map_path = csv_path.with_name("map_vid_vidorID.json")
    for p in (gsub_path, map_path):
        if not p.is_file():
            raise DataError(f"{csv_path}: NExT-GQA needs {p.name} beside it; not found: {p}")
    gsub, mapping = _read_json(gsub_path), _read_json(map_path)
    for p, d in ((gsub_path, gsub), (map_path, mapping)):
        if not isinstance(d, dict):
            raise DataError(f"{p}: expected a JSON object keyed by video id, got {type(d).__name__}")
    out: list[Sample] = []
    seen: dict[str, str] = {}
    with io.StringIO(read_text(csv_path), newline="") as f:  # a spreadsheet's BOM would rename column 1
        reader = csv.DictReader(f)
        missing = {"video_id", "qid", "question"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{csv_path}:1: missing column(s) {', '.join(sorted(missing))} in the header")
        for row in reader:
            where = f"{csv_path}:{reader.line_num}"
            if None in row or None in row.values():  # DictReader's markers for too many / too few fields
                raise DataError(f"{where}: expected {len(reader.fieldnames)} comma-separated fields "
                                f"({','.join(reader.fieldnames)})")
            vid, qid = row["video_id"].strip(), row["qid"].strip()
            info = gsub.get(vid)
            if not isinstance(info, dict) or not isinstance(info.get("location"), dict):
                raise DataError(f"{where}: video {vid} has no entry with a 'location' in {gsub_path.name}")
            if qid not in info["location"]:
                raise DataError(f"{where}: question {qid} of video {vid} has no span in {gsub_path.name}")
            if vid not in mapping:
                raise DataError(f"{where}: video {vid} is not in {map_path.name}")
            _add(out, seen, f"{where} ({gsub_path.name}: {vid}/{qid})", id=f"{vid}_{qid}",
                 video=_video_path(video_root, f"{mapping[vid]}.mp4"),
                 duration=_field(info, "duration", f"{where} ({gsub_path.name}: {vid})"),
                 query=row["question"], spans=info["location"][qid], source="nextgqa")
    return _nonempty(out, csv_path)


def read_rextime(path: str | Path, video_root: str | Path | None = None) -> list[Sample]:
    """ReXTime val, either form (told apart by the first character):

    * `rextime_val.json` (VideoMind's, a JSON list): `qid`, `vid`, `duration`, `question`, `span`.
    * `rextime_val.jsonl` (official): `qid`, `vid`, `duration`, `query`, `relevant_windows`.

    Both give the same 921 samples (id = qid). Duration comes from the file. Video:
    `{video_root}/activitynet/{vid}.mp4` when `len(vid) == 13` (ActivityNet ids `v_xxxxxxxxxxx`), else
    `{video_root}/qvhighlights/{vid}.mp4`; VideoMind's own layout, with its 3 fps folder level
    (`{video_root}/activitynet/videos_3fps_480_noaudio/{vid}.mp4`, what `prepare.py videos` extracts),
    is used instead when that file exists."""
    path = Path(path)
    out: list[Sample] = []
    seen: dict[str, str] = {}
    for where, d in _json_records(path):
        vid = str(_field(d, "vid", where))
        if "relevant_windows" in d:
            query, spans = _field(d, "query", where), d["relevant_windows"]
        else:
            query, spans = _field(d, "question", where), _field(d, "span", where)
        sub = "activitynet" if len(vid) == 13 else "qvhighlights"
        video = _video_path(video_root, f"{sub}/{vid}.mp4")
        if video_root and not os.path.isfile(video):  # VideoMind's own layout keeps the 3 fps folder level
            alt = _video_path(video_root, f"{sub}/videos_3fps_480_noaudio/{vid}.mp4")
            video = alt if os.path.isfile(alt) else video
        _add(out, seen, where, id=str(_field(d, "qid", where)), video=video,
             duration=_field(d, "duration", where), query=query, spans=spans, source="rextime")
    return _nonempty(out, path)


# The released cold-start file's reasoning field is named in no public code we could read, so it is
# detected: these names in order, then a chat list (LLaVA's `conversations`, or `messages`: the last
# assistant turn), then any text field holding a `<think>` tag. `convert --cot-field NAME` picks one.
COT_FIELDS = ("cot", "reasoning", "reasoning_process", "think", "thinking", "thought", "thoughts", "rationale",
              "chain_of_thought", "process", "response", "output", "solution", "gemini_response")
CHAT_FIELDS = ("conversations", "messages")


def _chat_answer(turns) -> str | None:
    """The last assistant turn's text of a chat list ({from: gpt, value} or {role: assistant, content})."""
    if not isinstance(turns, list):
        return None
    for t in reversed(turns):
        if isinstance(t, dict) and (t.get("from") or t.get("role")) in ("gpt", "assistant", "model"):
            text = t.get("value", t.get("content"))
            if isinstance(text, list):  # [{type: text, text: ...}, ...]
                text = "".join(c.get("text", "") for c in text if isinstance(c, dict))
            return text if isinstance(text, str) and text.strip() else None
    return None


def detect_cot_field(record: dict) -> str | None:
    """The field of one released record that holds the teacher's reasoning, or None."""
    for k in COT_FIELDS:
        if isinstance(record.get(k), str) and record[k].strip():
            return k
    for k in CHAT_FIELDS:
        if _chat_answer(record.get(k)) is not None:
            return k
    return next((k for k, v in record.items() if isinstance(v, str) and "<think>" in v), None)


def tag_block(text: str, tag: str) -> str | None:
    """The content of the last complete <tag>...</tag> (the last closing tag and the nearest opening one
    before it), or None."""
    end = text.rfind(f"</{tag}>")
    start = text.rfind(f"<{tag}>", 0, end) if end >= 0 else -1
    return text[start + len(tag) + 2:end] if start >= 0 else None


def split_reasoning(text: str) -> tuple[str, list[float] | None]:
    """A teacher's text -> (reasoning, its span or None). `<think>A</think> <time>[s, e]</time>` gives
    ("A", [s, e]); the span is read with the reward's strict parser from `<time>`, else from `<answer>`
    (the tag the paper's text names). A text without a <think> block is all reasoning, minus its answer."""
    import reward
    span = reward.parse_span(text, "time") or reward.parse_span(text, "answer")
    think = tag_block(text, "think")
    if think is None:
        think = text
        for tag in ("time", "answer"):
            block = tag_block(think, tag)
            if block is not None:
                think = think.replace(f"<{tag}>{block}</{tag}>", "")
    return think.strip(), None if span is None else [float(span[0]), float(span[1])]


def read_tvg_r1(path: str | Path, video_root: str | Path | None = None, cot_field: str = "auto",
                require_cot: bool = False) -> list[Sample]:
    """The released TVG-R1 training JSON: a list of objects with `problem` (the query), `video`, `video_length`
    (seconds), `gt_frame` and `dataset`; the cold-start file also holds the teacher's reasoning.

    `gt_frame` is `[start, end]` in SECONDS despite its name: TVG-R1's reward divides it by
    `video_length` exactly as it divides the predicted seconds. (A `choices` key, empty for grounding,
    is ignored.) When `video_length` is missing (TVG-R1 measures charades_train from the decoded video)
    the duration comes from the video file if it exists, else None. id = `id` or `qid` when present,
    else `{dataset}_{index}`; source = `dataset`. A JSONL file of the same objects also reads.
    Video: `resolve_video(video, video_root)` (the authors' absolute paths are found under the root).

    Reasoning: `cot_field` "auto" detects the field in the first record (`detect_cot_field`), a name
    reads that field, "none" reads none. Once a field is chosen every record must have it; its text
    becomes `cot` and, when it ends in a `<time>` span, `answer` (`split_reasoning`). With
    `require_cot` a file where none is found is an error that lists the fields there are."""
    path = Path(path)
    records = list(_json_records(path))
    field = None
    if cot_field == "auto" and records:
        field = detect_cot_field(records[0][1])
    elif cot_field not in ("auto", "none"):
        field = cot_field
    if require_cot and field is None:
        where, first = records[0] if records else (str(path), {})
        raise DataError(f"{where}: no reasoning field found (fields: {', '.join(sorted(first)) or 'none'}); "
                        f"name it with --cot-field NAME")
    cache: dict = {}
    out: list[Sample] = []
    seen: dict[str, str] = {}
    for i, (where, d) in enumerate(records):
        dataset = str(d.get("dataset") or "tvg_r1")
        video = resolve_video(str(_field(d, "video", where)), video_root)
        duration = d.get("video_length")
        if duration is None and video_root:
            duration = _video_duration(video, cache)
        sid = d.get("id", d.get("qid"))
        extra = {}
        if field is not None:
            text = _chat_answer(d.get(field)) if field in CHAT_FIELDS else d.get(field)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: no reasoning in field {field!r} (fields: {', '.join(sorted(d))})")
            extra["cot"], extra["answer"] = split_reasoning(text)
            if not extra["cot"]:
                raise DataError(f"{where}: the reasoning in field {field!r} is empty once its tags are removed")
        _add(out, seen, where, id=str(sid) if sid is not None else f"{dataset}_{i}", video=video, duration=duration,
             query=_field(d, "problem", where), spans=_field(d, "gt_frame", where), source=dataset, **extra)
    return _nonempty(out, path)


def read_benchmark(fmt: str, path: str | Path, video_root: str | Path | None = None,
                   durations: str | Path | dict | None = None, **tvg_r1) -> list[Sample]:
    """One entry point for scripts: fmt is one of BENCHMARK_FORMATS. `durations` applies to
    charades_sta only (the other formats carry their durations); `tvg_r1` keywords (cot_field,
    require_cot) to tvg_r1 only."""
    if durations is not None and fmt != "charades_sta":
        raise ValueError(f"durations apply to charades_sta only; {fmt} files carry their own durations")
    if fmt == "charades_sta":
        return read_charades_sta(path, video_root, durations)
    if fmt == "nextgqa":
        return read_nextgqa(path, video_root)
    if fmt == "rextime":
        return read_rextime(path, video_root)
    if fmt == "tvg_r1":
        return read_tvg_r1(path, video_root, **tvg_r1)
    raise ValueError(f"unknown benchmark format {fmt!r}; expected one of {', '.join(BENCHMARK_FORMATS)}")


# -----------------------------------------------------------------------------
# CLI


def _convert(args) -> None:
    kw = dict(cot_field=args.cot_field, require_cot=args.require_cot) if args.format == "tvg_r1" else {}
    samples = read_benchmark(args.format, args.input, args.video_root, args.durations, **kw)
    out = Path(args.out)
    write_jsonl(out, samples)
    if samples[0].cot is not None:
        field = args.cot_field if args.cot_field != "auto" else detect_cot_field(next(_json_records(Path(args.input)))[1])
        print(f"reasoning read from field {field!r} of every record ({sum(s.answer is not None for s in samples)} "
              "with the teacher's own <time> span)")
    # The same resolution read_jsonl will apply: relative video paths are relative to the JSONL's directory.
    missing = [s.video for s in samples if not os.path.isfile(out.parent / s.video)]
    with_duration = sum(s.duration is not None for s in samples)
    print(f"wrote {len(samples)} samples to {out}: {with_duration} with a known duration, "
          f"{len(samples) - len(missing)} with an existing video file")
    if missing and args.video_root:
        print(f"  {len(missing)} video file(s) not found, e.g. {out.parent / missing[0]}: check --video-root "
              "(eval and training need the videos; the conversion does not)")
    elif missing:
        print("  no --video-root given: video paths are relative to the output file's directory")
    if with_duration < len(samples):
        print(f"  {len(samples) - with_duration} sample(s) without a duration: pass --durations, or a --video-root "
              "with the videos to measure them")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build Sample JSONL files: the synthetic benchmark, or a "
                                "conversion of a real benchmark file.",
                                epilog="Examples are in the docstring at the top of data.py.")
    sub = p.add_subparsers(dest="command", required=True)

    # synth: the synthetic benchmark
    ps = sub.add_parser("synth", help="write synthetic mp4s with known events + train.jsonl / test.jsonl")
    ps.add_argument("--out", required=True, metavar="DIR", help="output directory (videos/, train.jsonl, test.jsonl); "
                    "finished videos are reused, so an interrupted run continues")
    ps.add_argument("--train", type=int, default=200, metavar="N",
                    help="number of training VIDEOS (each gives --events Samples)")
    ps.add_argument("--test", type=int, default=40, metavar="M",
                    help="number of test VIDEOS (each gives --events Samples)")
    ps.add_argument("--seed", type=int, default=0, help="random seed (same seed, same videos and samples)")
    ps.add_argument("--events", type=int, default=3,
                    help="events (coloured shapes) per video; each event is one query, the others distractors")
    ps.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes encoding videos")

    # convert: a real benchmark file -> Sample JSONL
    pc = sub.add_parser("convert", help="convert a benchmark file (Charades-STA, NExT-GQA, ReXTime, TVG-R1) "
                        "to Sample JSONL")
    pc.add_argument("--format", required=True, choices=BENCHMARK_FORMATS,
                    help="input format: charades_sta (.txt or TaRO .jsonl), nextgqa (test.csv), "
                    "rextime (.json or .jsonl), tvg_r1 (the released training JSON)")
    pc.add_argument("--input", required=True, metavar="FILE", help="the benchmark file; for nextgqa the test.csv, with "
                    "gsub_test.json and map_vid_vidorID.json beside it")
    pc.add_argument("--video-root", default=None, metavar="DIR", help="directory of the videos (layout per "
                    "format: see the read_* docstrings); without it video paths stay relative to the output file")
    pc.add_argument("--durations", default=None, metavar="JSON", help="charades_sta only: JSON {video id: "
                    "seconds} (e.g. VideoMind's durations.json), used when the input has no durations")
    pc.add_argument("--out", required=True, metavar="OUT.jsonl", help="output Sample JSONL (written atomically)")
    pc.add_argument("--cot-field", default="auto", metavar="NAME", help="tvg_r1 only: the field holding the "
                    "teacher's reasoning (cold-start file): auto detects it (data.COT_FIELDS, chat lists, a <think> "
                    "tag), none ignores it")
    pc.add_argument("--require-cot", action="store_true", help="tvg_r1 only: fail when no reasoning field is found "
                    "(the cold-start file must have one: SFT trains on it)")

    args = p.parse_args(argv)
    if args.command == "synth":
        if not 1 <= args.events <= len(SYNTH_COLORS):  # every event needs its own colour
            p.error(f"--events must be between 1 and {len(SYNTH_COLORS)}")
        synth(args.out, args.train, args.test, args.seed, args.events, args.workers)
    elif args.command == "convert":
        if args.durations is not None and args.format != "charades_sta":
            p.error("--durations applies to --format charades_sta only")
        if (args.require_cot or args.cot_field != "auto") and args.format != "tvg_r1":
            p.error("--cot-field and --require-cot apply to --format tvg_r1 only")
        try:
            _convert(args)
        except (DataError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
