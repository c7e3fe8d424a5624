"""Teacher chain-of-thought + IoU split: the cold-start SFT set and the RL set (the paper's data recipe).

    # 1 CPU, offline (the tiny preset): reasoning built from the synthetic data's dense captions
    python annotate.py --data runs/tiny/data/train.jsonl --teacher captions --noise 0.3 --out runs/tiny/annotate
    # the paper's teacher: Gemini 2.5 Pro (key in GEMINI_API_KEY or GOOGLE_API_KEY)
    python annotate.py --data train.jsonl --teacher gemini --out ann --concurrency 16
    # any OpenAI-compatible server, e.g. a vLLM serving Qwen2.5-VL-72B on a GPU node (key in OPENAI_API_KEY)
    python annotate.py --data train.jsonl --teacher openai --base-url http://gpu-node:8000/v1 \
                       --model Qwen/Qwen2.5-VL-72B-Instruct --out ann --concurrency 32

The teacher sees the video and the query, never the ground truth, under the paper's system prompt
(`data.SYSTEM_PROMPT`), and answers `<think>...</think><time>[s, e]</time>`. The IoU of its span
against the ground truth (best over GT spans, clamped to the video, exactly the RL reward's IoU)
decides where the sample goes:

    IoU >  hi (0.8)        -> coldstart.jsonl: the Sample with cot = the teacher's <think> text and
                              answer = the teacher's span (the SFT target); spans stay the ground truth
    lo <= IoU <= hi        -> rl.jsonl: the original Sample, unchanged (RL rewards use the ground truth)
    IoU <  lo (0.4)        -> dropped
    malformed answer       -> failed: no parseable <time> span, no <think> text, or a <think> that
                              would not give a well-formed SFT target; kept in annotations.jsonl
                              with IoU 0 and never used

For the paper's ablations without its filters (Tables 3 and 4; `run.sh ablations`) two more files:
coldstart_unfiltered.jsonl (every well-formed answer as an SFT target, whatever its IoU) and
rl_unfiltered.jsonl (every sample outside the cold start, the IoU < lo ones kept).

Teachers: `gemini` sends the mp4 itself (inline up to --inline-max-mb, else through the Files API,
deleted after use) with the official google-genai SDK; `openai` decodes --nframes frames once
(data.load_video, the same sampling as training) and sends each as a JPEG preceded by its time
("<12.5s>"), since chat APIs take images, not videos; `captions` needs no model (below). Each
answer is judged with reward.py; the SFT target is data.format_answer(cot, span), what sft.py trains on.

Paying once, surviving kill -9: `annotations.jsonl` IS the cache. One JSON line is appended, flushed
and fsynced per finished request, written by the main thread only (never interleaved). On start it is
read back and every (sample id, teacher, model) already answered is skipped with zero requests; a
kill -9 can only leave an unfinished last line, which is dropped (the request is re-made). A request
that still fails after its retries is logged with status "failed" but is not a cache hit, so a
re-run tries it again. coldstart.jsonl and rl.jsonl are rebuilt from annotations.jsonl and --data at
the end of every run, atomically, so changing --hi/--lo re-splits without a single request.

Where we differ from the paper or had to choose:
- The summary's "failed" column = malformed answers + requests that gave up; mean IoU is over the
  samples the teacher answered (malformed ones count as 0), not over failed requests.
- 429, 408, 5xx, timeouts, dropped connections, a body that is not JSON and a 200 without an answer
  (empty text, or an error object in place of the choices) are retried with exponential backoff (our
  own loop; the SDKs' retries are off so the behaviour is ours and tested). 401/403/404 abort the run
  (wrong key or model name: every request would fail); other 4xx fail only that sample. A video that
  does not decode (as training decodes it, data.load_video) is a failed sample before any request.
- The `captions` teacher is not a model: it picks the caption sharing the most words with the query
  (ties -> the earliest) and writes the captions with their times in time order up to that one,
  marked "(the query)" after its deciding word, then the answer. That is TaRO's "constructive
  reasoning" and the teacher of the synthetic tiny preset. `--noise P` corrupts a
  P share of the answers (half a wrong caption, half times shifted by up to 50% of the event's
  length), deterministic per (--seed, sample id), so the IoU filter has something to filter. Its
  "model" name records noise and seed, so a different noise is a different cache key.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import importlib
import io
import json
import math
import mimetypes
import os
import random
import re
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import data
import reward
from data import DataError, Sample


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Teacher chain-of-thought + IoU split into cold-start SFT and RL sets.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="training Samples, JSONL (data.py format)")
    g.add_argument("--out", required=True, help="output dir: annotations.jsonl (the cache), coldstart.jsonl, rl.jsonl")
    g.add_argument("--limit", type=int, default=None, help="annotate only the first N samples")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", required=True, choices=["gemini", "openai", "captions"],
                   help="gemini: google-genai SDK; openai: any OpenAI-compatible chat API; captions: offline")
    g.add_argument("--model", default=None,
                   help="teacher model name (gemini: default gemini-2.5-pro; openai: required)")
    g.add_argument("--base-url", default=None,
                   help="API endpoint (openai: e.g. http://host:8000/v1; gemini: a proxy or test server)")
    g.add_argument("--max-tokens", type=int, default=8192, help="max output tokens per answer (the paper's 8192)")
    g.add_argument("--nframes", type=int, default=data.NFRAMES,
                   help="openai teacher: frames sent per video (gemini: frames decoded to check the video first)")
    g.add_argument("--max-pixels", type=int, default=data.MAX_PIXELS, help="openai teacher: max pixels per frame")
    g.add_argument("--min-pixels", type=int, default=data.MIN_PIXELS, help="openai teacher: min pixels per frame")
    g.add_argument("--inline-max-mb", type=float, default=20.0,
                   help="gemini teacher: videos up to this size go inline, larger ones through the Files API")
    g = p.add_argument_group("captions teacher (offline)")
    g.add_argument("--noise", type=float, default=0.0, help="captions teacher: share of deliberately wrong answers")
    g.add_argument("--seed", type=int, default=0, help="captions teacher: seed of the noise")
    g = p.add_argument_group("IoU split")
    g.add_argument("--hi", type=float, default=0.8, help="IoU > hi: cold-start SFT set (paper eps1)")
    g.add_argument("--lo", type=float, default=0.4, help="IoU < lo: dropped; lo <= IoU <= hi: RL set (paper eps2)")
    g.add_argument("--rl-include-coldstart", action="store_true", help="also put the cold-start samples in rl.jsonl")
    g = p.add_argument_group("robustness")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    g.add_argument("--retries", type=int, default=6, help="retries per request on 429/5xx/timeouts, then give up")
    g.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubled each retry")
    g.add_argument("--max-backoff", type=float, default=60.0, help="longest retry delay in seconds")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it counts as timed out")
    args = p.parse_args(argv)
    if not 0.0 <= args.lo <= args.hi <= 1.0:
        p.error(f"need 0 <= --lo <= --hi <= 1, got lo={args.lo} hi={args.hi}")
    if not 0.0 <= args.noise <= 1.0:
        p.error(f"--noise is a probability, got {args.noise}")
    if args.concurrency < 1 or args.retries < 0:
        p.error("--concurrency must be >= 1 and --retries >= 0")
    if args.teacher == "openai" and not args.model:
        p.error("--teacher openai needs --model (the name the server serves)")
    return args


# -----------------------------------------------------------------------------
# Records


@dataclass
class Reply:
    """What a teacher returns for one sample."""
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0  # includes Gemini's thinking tokens: they are paid for too
    attempts: int = 1


@dataclass
class Annotation:
    """One line of annotations.jsonl: one sample answered (or not) by one teacher."""
    id: str
    source: str
    teacher: str
    model: str
    status: str  # "ok" | "malformed" (answered, unusable, IoU 0) | "failed" (gave up; retried next run)
    response: str | None  # the teacher's raw text
    span: list[float] | None  # the teacher's parsed span (as written, not clamped)
    iou: float  # best IoU against the ground truth spans, clamped to [0, duration]
    tokens: dict = field(default_factory=dict)  # {"prompt": n, "completion": n}
    attempts: int = 1
    seconds: float = 0.0
    error: str | None = None  # why it failed (the API key is redacted)


def split_of(iou: float, hi: float, lo: float) -> str:
    """The paper's filter; both boundaries belong to the RL set."""
    if iou > hi:
        return "coldstart"
    if iou < lo:
        return "dropped"
    return "rl"


def think_text(text: str) -> str:
    """The last complete <think>...</think> block, stripped ('' if none)."""
    return (data.tag_block(text, "think") or "").strip()


def judge(text: str, sample: Sample) -> tuple[str, list[float] | None, float]:
    """(status, parsed span, IoU) of one answer. The IoU is the RL reward's own: reward.parse_span
    (strict, last <time> block), clamped to the video, best over the GT spans."""
    _, parts = reward.tvg_reward(text, sample.spans, sample.duration, w_iou=1.0, w_format=0.0)
    span = None if parts["span"] is None else [float(parts["span"][0]), float(parts["span"][1])]
    cot = think_text(text)
    # A <think> holding its own <time> or tags would make a target the format reward rejects.
    if span is None or not cot or reward.format_reward(data.format_answer(cot, span)) != 1.0:
        return "malformed", span, 0.0
    return "ok", span, parts["iou"]


# -----------------------------------------------------------------------------
# Retries: our own loop (SDK retries off), so what is retried is decided and tested here.


class BadReply(Exception):
    """A reply with status 200 that holds no answer: empty text, or an error object where the choices
    (candidates) should be (some gateways answer errors with 200). Retried like a 5xx."""


class GaveUp(Exception):
    def __init__(self, attempts: int, error: BaseException):
        super().__init__(f"gave up after {attempts} attempt(s): {type(error).__name__}: {error}")
        self.attempts, self.error = attempts, error


def status_of(e: BaseException) -> int | None:
    code = getattr(e, "status_code", None) or getattr(e, "code", None)  # openai / google-genai
    return code if isinstance(code, int) else None


@functools.lru_cache(maxsize=1)
def transport_errors() -> tuple[type[BaseException], ...]:
    """The transport errors worth a retry. main() calls this once before any worker thread starts: a
    first `import httpx` racing in two threads leaves a half-initialised module in sys.modules that
    the openai SDK then trips over (seen once gradio, which brings httpx, was installed)."""
    import openai  # wraps its transport errors in APIConnectionError (and APITimeoutError)
    transport = []  # google-genai lets httpx/httpx2 errors through; it uses whichever is installed
    for name in ("httpx", "httpx2"):
        try:
            transport.append(importlib.import_module(name).TransportError)
        except ImportError:
            pass
    return (openai.APIConnectionError, TimeoutError, ConnectionError, *transport)


def is_transient(e: BaseException) -> bool:
    """429, 408, 5xx, timeouts, dropped connections, a body that is not JSON (cut or garbled on the way)
    and a 200 without an answer: worth another try."""
    status = status_of(e)
    if status is not None:
        return status in (408, 429) or status >= 500
    return isinstance(e, (BadReply, json.JSONDecodeError, *transport_errors()))


def with_retries(call: Callable, args, stop: threading.Event) -> tuple[object, int]:
    """(call(), attempts). Exponential backoff with jitter; non-transient errors raise at once.
    `stop` is set when the run aborts: no more retries then."""
    for attempt in range(1, args.retries + 2):
        try:
            return call(), attempt
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt > args.retries or stop.is_set():
                raise GaveUp(attempt, e) from e
            # Jitter spreads the retries of parallel workers that hit the same rate limit.
            stop.wait(min(args.backoff * 2 ** (attempt - 1), args.max_backoff) * random.uniform(0.5, 1.0))


def is_request_error(e: BaseException) -> bool:
    """Errors that fail one sample (recorded, retried on the next run); anything else is a bug: crash."""
    import openai
    from google.genai import errors as genai_errors
    return isinstance(e, (GaveUp, DataError, openai.APIError, genai_errors.APIError,
                          genai_errors.UnknownApiResponseError)) or is_transient(e)


# -----------------------------------------------------------------------------
# Teachers: each is a function Sample -> Reply, built once with its client.


MARK = " (the query)"


def words(text: str) -> list[str]:
    """The lowercase words of a caption or query, as the captions teacher compares them."""
    return re.findall(r"[a-z0-9]+", text.lower())


def mark_caption(text: str, others: list[str], query: set[str]) -> str:
    """`text` with MARK after its last word that no other caption has and the query has (else after its
    last word no other caption has, else at the end): right after the word that decides the match."""
    mine, other = words(text), set().union(*map(words, others))
    own = [k for k, w in enumerate(mine) if w not in other]
    key = [k for k in own if mine[k] in query] or own
    if not key:
        return text + MARK
    cut = list(re.finditer(r"[A-Za-z0-9]+", text))[key[-1]].end()  # the same words, with their places
    return text[:cut] + MARK + text[cut:]


def caption_answer(sample: Sample, noise: float, seed: int) -> str:
    """Reasoning built from the dense captions: the events in time order, each with its times, up to the
    caption that best matches the query (most shared words, ties -> earliest), marked "(the query)",
    then its span."""
    caps = sorted(sample.captions, key=lambda c: (float(c["start"]), float(c["end"])))
    texts = [str(c["text"]).strip().rstrip(".") for c in caps]
    times = [(float(c["start"]), float(c["end"])) for c in caps]
    query = set(words(sample.query))
    overlap = [len(query & set(words(t))) for t in texts]
    pick = overlap.index(max(overlap))
    rng = random.Random(f"{seed}:{sample.id}")  # str seeds are stable across runs and machines
    if rng.random() < noise:
        if rng.random() < 0.5 and len(caps) > 1:  # the wrong event
            pick = rng.choice([i for i in range(len(caps)) if i != pick])
        else:  # the right event, at shifted times
            s, e = times[pick]
            shift = rng.uniform(-0.5, 0.5) * (e - s)
            end = sample.duration if sample.duration else math.inf
            times[pick] = (min(max(s + shift, 0.0), end), min(max(e + shift, 0.0), end))
    # Scan in time order and stop at the match, so the answer repeats the times just written. Two
    # wordings the tiny model did not learn (measured): listing every event and then "The query matches
    # <caption> from ..." (after 1,500 SFT steps its listed times were close, but it took the queried
    # event's times at chance, 32% of 300 test queries), and a verdict after the times ("That is (not)
    # the query.", 17% mIoU after 900 steps). The mark sits right after the word that decides the
    # match, so the decision is a lookup of the word just written in the query.
    steps = []
    for k in range(pick + 1):
        text = mark_caption(texts[k], texts[:k] + texts[k + 1:], query) if k == pick else texts[k]
        steps.append(f"{text[:1].upper() + text[1:]} from {times[k][0]:.2f} s to {times[k][1]:.2f} s.")
    s, e = times[pick]
    cot = " ".join(steps) + f" So the answer is {s:.2f} to {e:.2f} seconds."
    return data.format_answer(cot, (s, e))


def check_captions(samples: list[Sample]) -> None:
    for s in samples:
        if not s.captions:
            raise DataError(f"sample {s.id}: the captions teacher needs dense captions, this sample has none")
        for c in s.captions:
            if not (isinstance(c, dict) and {"start", "end", "text"} <= set(c)):
                raise DataError(f"sample {s.id}: a caption must be {{start, end, text}}, got {c!r}")


def jpeg_b64(frame) -> str:
    """(C, H, W) float 0-255 tensor -> base64 JPEG."""
    from PIL import Image
    img = Image.fromarray(frame.clamp(0, 255).round().byte().permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


def openai_messages(sample: Sample, args) -> list[dict]:
    """The paper's chat (data.build_messages: system prompt, video, query) with the video as frames:
    each frame an image preceded by its time, e.g. "<12.5s>", so the teacher can read times."""
    frames, meta = data.load_video(sample, args.nframes, args.max_pixels, args.min_pixels)  # decoded once
    system, user = data.build_messages(sample, args.nframes, args.max_pixels, args.min_pixels)
    content = []
    for part in user["content"]:
        if part["type"] == "video":
            for frame, idx in zip(frames, meta["frames_indices"]):
                content.append({"type": "text", "text": f"<{idx / meta['fps']:.1f}s>"})
                content.append({"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{jpeg_b64(frame)}"}})
        else:
            content.append(part)
    return [{"role": "system", "content": system["content"][0]["text"]}, {"role": "user", "content": content}]


def make_teacher(args, key: str | None, stop: threading.Event) -> tuple[Callable[[Sample], Reply], str]:
    """(ask, model name). The model name is part of the cache key."""
    if args.teacher == "captions":
        return (lambda s: Reply(caption_answer(s, args.noise, args.seed))), f"captions-v3-noise{args.noise:g}-seed{args.seed}"

    if args.teacher == "openai":
        from openai import OpenAI
        client = OpenAI(base_url=args.base_url, api_key=key, max_retries=0, timeout=args.timeout)

        def chat(messages: list[dict]):
            resp = client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens)
            if not (resp.choices and resp.choices[0].message.content):
                raise BadReply(f"no answer text in the reply ({getattr(resp, 'error', None) or 'empty'})")
            return resp

        def ask_openai(sample: Sample) -> Reply:
            messages = openai_messages(sample, args)
            resp, attempts = with_retries(lambda: chat(messages), args, stop)
            u = resp.usage
            return Reply(resp.choices[0].message.content, u.prompt_tokens if u else 0,
                         u.completion_tokens if u else 0, attempts)
        return ask_openai, args.model

    from google import genai
    from google.genai import types
    model = args.model or "gemini-2.5-pro"
    client = genai.Client(api_key=key, http_options=types.HttpOptions(
        base_url=args.base_url, timeout=int(args.timeout * 1000)))  # retry_options unset: SDK never retries
    config = types.GenerateContentConfig(system_instruction=data.SYSTEM_PROMPT, max_output_tokens=args.max_tokens)

    def upload(path: str, mime: str):
        f, _ = with_retries(lambda: client.files.upload(file=path, config={"mime_type": mime}), args, stop)
        deadline = time.time() + args.timeout
        while f.state != types.FileState.ACTIVE:  # the Files API processes a video before it can be used
            if f.state == types.FileState.FAILED or time.time() > deadline:
                raise DataError(f"Files API could not process {path}: state {f.state}, {f.error}")
            stop.wait(2)
            f, _ = with_retries(lambda: client.files.get(name=f.name), args, stop)
        return f

    def generate(video, query: str):
        resp = client.models.generate_content(model=model, contents=[video, query], config=config)
        if not resp.text:
            why = resp.candidates[0].finish_reason if resp.candidates else "no candidates"
            raise BadReply(f"no answer text in the reply ({why})")
        return resp

    def ask_gemini(sample: Sample) -> Reply:
        _, user = data.build_messages(sample)  # the paper's order: the video, then the query
        path, query = user["content"][0]["video"], user["content"][1]["text"]
        # Decoded once as training will decode it: a video it cannot read (zero bytes, truncated, damaged
        # frames, shorter than its span) is a failed sample here, not a paid answer.
        data.load_video(sample, args.nframes, args.max_pixels, args.min_pixels)
        mime = mimetypes.guess_type(path)[0] or "video/mp4"
        uploaded = None
        if os.path.getsize(path) <= args.inline_max_mb * 2**20:  # the inline request limit is ~20 MB
            video = types.Part.from_bytes(data=Path(path).read_bytes(), mime_type=mime)
        else:
            video = uploaded = upload(path, mime)
        try:
            resp, attempts = with_retries(lambda: generate(video, query), args, stop)
        finally:
            if uploaded is not None:  # files expire after 48 h anyway; do not keep quota busy
                try:
                    client.files.delete(name=uploaded.name)
                except Exception as e:  # a leftover upload is harmless; say so and go on
                    print(f"note: could not delete {uploaded.name}: {type(e).__name__}", file=sys.stderr)
        u = resp.usage_metadata
        completion = (u.candidates_token_count or 0) + (u.thoughts_token_count or 0) if u else 0
        return Reply(resp.text, (u.prompt_token_count or 0) if u else 0, completion, attempts)
    return ask_gemini, model


def api_key(teacher: str) -> str | None:
    """From the environment only; never printed, logged or written (errors are redacted)."""
    if teacher == "gemini":
        key = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        if not key:
            sys.exit("error: --teacher gemini needs GEMINI_API_KEY (or GOOGLE_API_KEY) in the environment")
        return key
    if teacher == "openai":
        # A local vLLM started without --api-key accepts any key; the SDK insists on one.
        return os.environ.get("OPENAI_API_KEY") or "EMPTY"
    return None


# -----------------------------------------------------------------------------
# One sample


def annotate_one(sample: Sample, ask: Callable[[Sample], Reply], teacher: str, model: str,
                 key: str | None) -> Annotation:
    t0 = time.time()
    base = dict(id=sample.id, source=sample.source, teacher=teacher, model=model)
    try:
        reply = ask(sample)
    except Exception as e:
        if not is_request_error(e):
            raise  # a bug in our code, not the teacher's failure: stop with the traceback
        msg = f"{type(e).__name__}: {e}"
        if key:  # some servers quote the key back in their error messages
            msg = msg.replace(key, "***")
        if status_of(e) in (401, 403, 404):  # a wrong key or model name: every request would fail
            raise SystemExit(f"error: sample {sample.id}: {msg}\n(check the key, --model and --base-url)")
        return Annotation(**base, status="failed", response=None, span=None, iou=0.0,
                          attempts=getattr(e, "attempts", 1), seconds=time.time() - t0, error=msg[:2000])
    status, span, iou = judge(reply.text, sample)
    return Annotation(**base, status=status, response=reply.text, span=span, iou=iou,
                      tokens={"prompt": reply.prompt_tokens, "completion": reply.completion_tokens},
                      attempts=reply.attempts, seconds=time.time() - t0)


# -----------------------------------------------------------------------------
# The cache: annotations.jsonl


def load_annotations(path: Path) -> list[Annotation]:
    """Read the cache. A kill -9 can only leave an unfinished LAST line (each record is one write
    of a whole line): that fragment is cut off (it holds no finished answer) so the next append
    starts on a fresh line. Any other bad line is a real problem and raises naming the line."""
    if not path.exists():
        return []
    torn = data.drop_torn_tail(path)
    if torn:
        print(f"note: {path}: dropping an unfinished last line ({torn} bytes) from an interrupted run", file=sys.stderr)
    out = []
    for where, d in data.json_lines(path):
        try:
            out.append(Annotation(**d))
        except TypeError as e:  # not an object, or other fields
            raise DataError(f"{where}: not an annotation record ({e})") from None
    return out


def latest(records: list[Annotation], teacher: str, model: str) -> dict[str, Annotation]:
    """id -> this teacher's record; an answer ("ok"/"malformed") wins over a failed attempt."""
    out: dict[str, Annotation] = {}
    for r in records:
        if r.teacher == teacher and r.model == model:
            if r.status != "failed" or r.id not in out or out[r.id].status == "failed":
                out[r.id] = r
    return out


# -----------------------------------------------------------------------------
# Split + summary


def split_samples(samples: list[Sample], final: dict[str, Annotation], hi: float, lo: float,
                  rl_include_coldstart: bool) -> tuple[list[Sample], list[Sample], dict, dict]:
    """(coldstart, rl, per-source counts, unfiltered) from the records; samples keep the input order.
    unfiltered: the paper's ablations without its filters (Tables 3 and 4): "coldstart", every
    well-formed teacher answer as an SFT target whatever its IoU; "rl", every sample outside the cold
    start (the IoU < lo ones kept), with its original ground truth."""
    coldstart, rl, unfiltered = [], [], {"coldstart": [], "rl": []}
    rows: dict[str, dict] = defaultdict(lambda: {"n": 0, "coldstart": 0, "rl": 0, "dropped": 0, "failed": 0,
                                                 "malformed": 0, "ious": []})
    for s in samples:
        row, r = rows[s.source or "-"], final.get(s.id)
        row["n"] += 1
        if r is None or r.status == "failed":
            row["failed"] += 1
            unfiltered["rl"].append(s)
            continue
        row["ious"].append(r.iou)
        if r.status == "malformed":
            row["failed"] += 1
            row["malformed"] += 1
            unfiltered["rl"].append(s)
            continue
        where = split_of(r.iou, hi, lo)
        row[where] += 1
        unfiltered["coldstart"].append(replace(s, cot=think_text(r.response), answer=list(r.span)))
        if where == "coldstart":
            coldstart.append(unfiltered["coldstart"][-1])
        else:
            unfiltered["rl"].append(s)
        if where == "rl" or (where == "coldstart" and rl_include_coldstart):
            rl.append(s)
    return coldstart, rl, dict(rows), unfiltered


def print_summary(rows: dict) -> None:
    total = {k: sum(r[k] for r in rows.values()) for k in ("n", "coldstart", "rl", "dropped", "failed", "malformed")}
    total["ious"] = [v for r in rows.values() for v in r["ious"]]
    width = max([len(k) for k in rows] + [6])
    print(f"{'source':<{width}} | {'n':>6} | {'coldstart':>9} | {'rl':>6} | {'dropped':>7} | {'failed':>6} | mean IoU")
    for name, r in sorted(rows.items()) + [("all", total)]:
        miou = f"{sum(r['ious']) / len(r['ious']):.2f}" if r["ious"] else "-"
        print(f"{name:<{width}} | {r['n']:>6} | {r['coldstart']:>9} | {r['rl']:>6} | {r['dropped']:>7} | "
              f"{r['failed']:>6} | {miou:>8}")
    print(f"(failed = {total['malformed']} malformed answer(s), kept with IoU 0, + "
          f"{total['failed'] - total['malformed']} request(s) that gave up, retried by the next run; "
          f"mean IoU over answered samples)")


# -----------------------------------------------------------------------------
# Main


def main(argv=None) -> None:
    args = get_args(argv)
    samples = data.read_jsonl(args.data)[: args.limit]  # ids are unique: they key the cache
    seen = {s.id for s in samples}
    if args.teacher == "captions":
        check_captions(samples)
    key = api_key(args.teacher)
    stop = threading.Event()  # set when the run ends or aborts: workers still running stop retrying
    ask, model = make_teacher(args, key, stop)
    transport_errors()  # import the HTTP stacks here, in one thread, before the workers start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ann_path = out / "annotations.jsonl"

    with open(ann_path, "a", encoding="utf-8") as log:
        try:  # two runs appending to one cache would pay twice for the same samples
            fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"error: another annotate.py is writing {ann_path}")
        records = load_annotations(ann_path)
        done = {i for i, r in latest(records, args.teacher, model).items() if r.status != "failed"}
        todo = [s for s in samples if s.id not in done]
        print(f"teacher {args.teacher} / {model}" + (f" at {args.base_url}" if args.base_url else "")
              + f": {len(samples)} samples, {len(samples) - len(todo)} cached, {len(todo)} to annotate")
        from tqdm import tqdm
        pool = ThreadPoolExecutor(args.concurrency)
        try:
            futures = [pool.submit(annotate_one, s, ask, args.teacher, model, key) for s in todo]
            failed = 0
            bar = tqdm(as_completed(futures), total=len(futures), desc=f"annotate ({args.teacher})", file=sys.stderr)
            for fut in bar:
                rec = fut.result()
                # One write of one whole line, then flush + fsync: a kill -9 loses at most the
                # requests in flight and can only leave a partial last line.
                log.write(json.dumps(asdict(rec), ensure_ascii=False) + "\n")
                log.flush()
                os.fsync(log.fileno())
                records.append(rec)
                failed += rec.status != "ok"
                bar.set_postfix(failed=failed, refresh=False)  # redrawn at tqdm's own pace
        finally:  # Ctrl-C or an abort: do not start the queued requests
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    final = {i: r for i, r in latest(records, args.teacher, model).items() if i in seen}
    coldstart, rl, rows, unfiltered = split_samples(samples, final, args.hi, args.lo, args.rl_include_coldstart)
    data.write_jsonl(out / "coldstart.jsonl", coldstart)
    data.write_jsonl(out / "rl.jsonl", rl)
    for name, kept in unfiltered.items():  # for the ablations without the filters (run.sh ablations)
        data.write_jsonl(out / f"{name}_unfiltered.jsonl", kept)
    print()
    print_summary(rows)
    errors = sorted({r.error for r in final.values() if r.status == "failed"})
    for e in errors[:5]:
        print(f"  error: {e}")
    tokens = sum(sum(r.tokens.values()) for r in final.values())
    print(f"hi={args.hi} lo={args.lo}; teacher tokens used: {tokens:,}")
    print(f"wrote {out / 'annotations.jsonl'} ({len(final)} samples), {out / 'coldstart.jsonl'} ({len(coldstart)}), "
          f"{out / 'rl.jsonl'} ({len(rl)}); without the IoU filters (ablations): coldstart_unfiltered.jsonl "
          f"({len(unfiltered['coldstart'])}), rl_unfiltered.jsonl ({len(unfiltered['rl'])})")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # bad input: the message names the file:line or the sample
        sys.exit(f"error: {e}")
