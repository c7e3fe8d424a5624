"""Data for every stage: the Sample record, the paper's prompt, video -> model inputs, benchmark
readers and a synthetic benchmark with known events.

    python data.py synth   --out data/synth --train 400 --test 100 --seed 0
    python data.py convert --format charades_sta --input ../shared/data/charades_sta/charades_sta_test.txt \
                           --video-root /data/charades/videos --out charades_test.jsonl
    python data.py convert --format nextgqa --input ../shared/data/nextgqa/test.csv --out nextgqa_test.jsonl
    python data.py convert --format rextime --input ../shared/data/rextime/rextime_val.jsonl --out rextime_val.jsonl
    python data.py convert --format tvg_r1  --input TVG_RL_18K.json --video-root /data/tvg --out rl.jsonl

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
import json
import math
import os
import sys
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
    try:
        s, e = float(span[0]), float(span[1])
    except (TypeError, ValueError):
        raise DataError(f"{where}: span times must be numbers, got {span!r}") from None
    if not (math.isfinite(s) and math.isfinite(e)):
        raise DataError(f"{where}: span times must be finite, got {span!r}")
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
    spans = d["spans"]
    if not isinstance(spans, list) or not spans:
        raise DataError(f"{where}: spans must be a non-empty list of [start, end], got {spans!r}")
    if not isinstance(spans[0], (list, tuple)):  # a single span written flat: [s, e]
        spans = [spans]
    d = dict(d, id=str(d["id"]), duration=duration, spans=[_check_span(s, where) for s in spans])
    if d.get("answer") is not None:
        d["answer"] = _check_span(d["answer"], where)
    return Sample(**d)


def read_jsonl(path: str | Path) -> list[Sample]:
    """Read Samples; a relative video path is resolved against the JSONL's directory."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            s = sample_from_dict(d, f"{path}:{i}")
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


def load_video(sample: Sample, nframes: int = NFRAMES, max_pixels: int = MAX_PIXELS,
               min_pixels: int = MIN_PIXELS):
    """Decode and resize one Sample's video ONCE: returns (frames (T, C, H, W) float, metadata).
    GRPO reuses the result for all G rollouts of a prompt; eval and SFT call it once per sample.

    The metadata (source fps, sampled frame indices) is what makes the time encoding right: the
    processor derives `second_per_grid_ts` = temporal_patch_size / sampled_fps from it."""
    import decord
    from qwen_vl_utils import fetch_video

    path = sample.video
    if not os.path.isfile(path):
        raise DataError(f"sample {sample.id}: video not found: {path}")
    try:  # qwen-vl-utils swallows decord errors and retries with torchvision: check readability here
        total = len(decord.VideoReader(path))
    except Exception as e:  # decord raises its own DECORDError for corrupt files
        raise DataError(f"sample {sample.id}: cannot decode video {path}: {e}") from None
    if total < 2:
        raise DataError(f"sample {sample.id}: video {path} has {total} frame(s); need at least 2")
    # A clip shorter than the frame budget is sampled at every frame (qwen-vl-utils would raise).
    ele = build_messages(sample, min(nframes, _even_floor(total)), max_pixels, min_pixels)[1]["content"][0]
    frames, meta = fetch_video(ele, return_video_metadata=True)
    return frames, meta


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
    texts = []
    for i, s in enumerate(samples):
        msgs = build_messages(s, nframes, max_pixels, min_pixels, None if answers is None else answers[i])
        texts.append(processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answers is None))
    processor.tokenizer.padding_side = padding_side
    # do_sample_frames=False / do_resize=False: frames are already sampled and resized by qwen-vl-utils.
    # video_metadata is the part peers forget: without it the processor assumes 24 fps.
    return processor(text=texts, videos=[v for v, _ in videos], video_metadata=[m for _, m in videos],
                     do_sample_frames=False, do_resize=False, padding=True, return_tensors="pt")


# -----------------------------------------------------------------------------
# Synthetic benchmark: real mp4 files with coloured shapes shown in known windows.
# Each video has several events; every event has its own colour, so the query ("the red circle")
# names exactly one event and the others are distractors the model must not pick.

SYNTH_COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
                "white": (245, 245, 245), "magenta": (220, 50, 220), "cyan": (40, 220, 230), "orange": (245, 140, 20)}
SYNTH_SHAPES = ["square", "circle", "triangle", "bar"]
SYNTH_TEMPLATES = ["when does the {c} {s} appear?", "the {c} {s} is visible", "{a} {c} {s} moves across the screen",
                   "find the moment the {c} {s} is shown"]
SYNTH_FPS = 4  # frames per second of the written mp4 files; event times are multiples of 1/SYNTH_FPS
SYNTH_SIZE = 112  # pixels (square)


def synth_query(color: str, shape: str, template: int = 0) -> str:
    return SYNTH_TEMPLATES[template % len(SYNTH_TEMPLATES)].format(a=_article(color), c=color, s=shape)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def synth_caption(color: str, shape: str) -> str:
    return f"{_article(color)} {color} {shape} moves across the screen"


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
    paths = [(rng.uniform(20, SYNTH_SIZE - 20, 2), rng.uniform(20, SYNTH_SIZE - 20, 2)) for _ in events]
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
                    img[_shape_mask(ev["shape"], cx, cy, 14.0, yy, xx)] = SYNTH_COLORS[ev["color"]]
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


def synth(out: str, n_train: int, n_test: int, seed: int = 0, events: int = 3) -> None:
    """Write OUT/videos/*.mp4, OUT/train.jsonl and OUT/test.jsonl (n_* counts videos; each video
    gives one Sample per event). Train and test use disjoint videos. Finished videos are reused, so an
    interrupted run continues."""
    from tqdm import tqdm
    out_dir = Path(out)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    for split, lo, hi in (("train", 0, n_train), ("test", n_train, n_train + n_test)):
        samples = []
        for i in tqdm(range(lo, hi), desc=f"synth {split}", leave=False):
            samples += synth_one(i, seed, out_dir, events)
        write_jsonl(out_dir / f"{split}.jsonl", samples)
        print(f"wrote {len(samples)} samples ({hi - lo} videos) to {out_dir / f'{split}.jsonl'}")


# -----------------------------------------------------------------------------
# Readers for the real benchmark files (../shared/data) and the released TVG-R1 training JSON.
# (section owned by the readers work; see tests/test_data_readers.py)


# -----------------------------------------------------------------------------
# CLI
