r"""The paper preset rehearsed on a CPU: a miniature of the released world, and a local stand-in for the hub.

    bash run.sh paper --rehearsal                          # what a user runs: build, serve, then the paper preset
    python rehearsal.py build --out runs/rehearsal/world   # the miniature world only
    python rehearsal.py serve --root runs/rehearsal/world/hub --port-file hub.port   # serve it (HF_ENDPOINT)

`bash run.sh paper` downloads Qwen2.5-VL-7B-Instruct, TVG-R1's cold-start and RL files and the videos
from the Hugging Face Hub, then trains on 16 GPUs. None of that is reachable here, so `build` makes a
small world with the same shapes, and `serve` speaks the hub's HTTP protocol over it on 127.0.0.1:

* `yeliudev/VideoMind-Dataset`: synthetic mp4s packed as VideoMind packs its videos: split archives
  (`videos.tar.gz.00`, `.01`), single ones (`videos.tar.gz`), 3 fps re-encodes
  (`videos_3fps_480_noaudio.tar.gz[.NN]`) beside some originals, `durations.json` for Charades-STA, and
  files the recipe must NOT download (cropped clips, other benchmarks' originals).
* `WHB139426/Grounded-VideoLLM`: `activitynet/chunk_N.zip` and `qvhighlights/chunk_N.zip`.
* `RuizheChen/TVG_processed_data`: a cold-start JSON and an RL JSON with TVG-R1's field names
  (`problem`, `video`, `video_length`, `gt_frame`, `dataset`, `choices`, `ground_truth`) and video paths
  written the authors' way (`/opt/tiger/video-r1/data/<source>/videos/<id>.mp4`); the cold-start file
  adds the teacher's reasoning under a name our converter must detect.
* `Qwen/Qwen2.5-VL-7B-Instruct`: the tiny random Qwen2.5-VL (`model.py tiny`) under the 7B's name.
* For our own annotation (ABLATIONS=1 rehearses it): `train_raw.json` (every training sample, no
  reasoning: the TRAIN_JSON of `bash run.sh paper` with GEMINI_API_KEY) and `teacher.json`, the
  answers of a Gemini stand-in (`serve --teacher`: `generateContent` with the video inline), keyed by
  the video's bytes and the query.
* The three benchmark annotation files, in their real formats (Charades-STA txt, NExT-GQA csv +
  gsub + map, ReXTime jsonl), pointing at the miniature's videos (not served: the repo ships the real
  ones in assets/; the rehearsal passes these instead, a location override).

The hub stand-in implements what huggingface_hub 2.4 calls for `list_repo_tree` and `hf_hub_download`:
`GET /api/{models,datasets}/OWNER/NAME/tree/REV[/PATH]` and `HEAD`/`GET` (with `Range`, for resumed
downloads) of `/[datasets/]OWNER/NAME/resolve/REV/PATH`. Every request is appended to `requests.jsonl`
beside the served root, so tests can see what the recipe downloaded. It is the one stand-in this
project allows for a service we cannot reach; the rest of the rehearsal is the paper preset's own code.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

# -----------------------------------------------------------------------------
# The hub stand-in: ROOT/{models,datasets}/OWNER/NAME/<files>

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # one fixed revision: the world does not change


class Hub:
    """A ThreadingHTTPServer on 127.0.0.1 serving ROOT in the hub's protocol; `with Hub(root) as hub:`
    then HF_ENDPOINT=hub.url."""

    def __init__(self, root: str | Path, port: int = 0, log: str | Path | None = None,
                 teacher: str | Path | None = None):
        self.root = Path(root).resolve()
        # the Gemini stand-in's answers (`build`'s teacher.json: "<sha256 of the mp4>:<query>" -> text)
        self.teacher = json.loads(Path(teacher).read_text()) if teacher else None
        self.log = Path(log) if log else self.root.parent / "requests.jsonl"
        self.lock = threading.Lock()
        self.unavailable: set[str] = set()  # repo paths listed but not served (a test's lost connection)
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def record(self, method: str, path: str, status: int) -> None:
        with self.lock, open(self.log, "a") as f:
            f.write(json.dumps({"method": method, "path": path, "status": status}) + "\n")

    def repo_dir(self, kind: str, owner: str, name: str) -> Path:
        return self.root / kind / owner / name


def _etag(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _handler(hub: Hub):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet: requests.jsonl is the log
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head=False):
            headers = dict(headers or {})
            headers.setdefault("Content-Length", len(body))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, str(v))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            hub.record(self.command, self.path, status)

        def _not_found(self, head=False):
            body = json.dumps({"error": "Entry not found"}).encode()
            self._send(404, body, {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"}, head)

        def _route(self, head: bool):
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if parts[:1] == ["api"] and len(parts) >= 6 and parts[4] == "tree":  # api/KIND/OWNER/NAME/tree/REV[/PATH]
                kind, owner, name = parts[1], parts[2], parts[3]
                return self._tree(hub.repo_dir(kind, owner, name), "/".join(parts[6:]), parse_qs(url.query), head)
            kind = "datasets" if parts[:1] == ["datasets"] else "models"
            if kind == "datasets":
                parts = parts[1:]
            if len(parts) >= 5 and parts[2] == "resolve":  # OWNER/NAME/resolve/REV/PATH
                if "/".join(parts[4:]) in hub.unavailable:
                    return self._not_found(head)
                return self._file(hub.repo_dir(kind, parts[0], parts[1]) / "/".join(parts[4:]), head)
            return self._not_found(head)

        def _tree(self, repo: Path, sub: str, query: dict, head: bool):
            base = repo / sub
            if not base.is_dir():
                return self._not_found(head)
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            entries = []
            walk = sorted(base.rglob("*")) if recursive else sorted(base.iterdir())
            for p in walk:
                rel = p.relative_to(repo).as_posix()
                if p.is_dir():
                    entries.append({"type": "directory", "path": rel, "oid": COMMIT[:40]})
                else:
                    entries.append({"type": "file", "path": rel, "size": p.stat().st_size, "oid": _etag(p)})
            self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)

        def _file(self, path: Path, head: bool):
            if not path.is_file():
                return self._not_found(head)
            size = path.stat().st_size
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_etag(path)}"', "Accept-Ranges": "bytes"}
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and not head:  # a resumed download: "bytes=N-"
                start = int(rng[6:].split("-")[0] or 0)
            with open(path, "rb") as f:
                f.seek(start)
                body = b"" if head else f.read()
            headers["Content-Length"] = size - start if not head else size
            if start:
                headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
            self._send(206 if start else 200, body, headers, head)

        def do_POST(self):
            """Gemini's generateContent (`annotate.py --teacher gemini --base-url`): the video inline (the
            rehearsal's files are far under the 20 MB inline limit), then the query; the answer is the
            one `build` wrote for that video and query."""
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if hub.teacher is None or not self.path.endswith(":generateContent"):
                return self._not_found()
            import base64
            parts = body["contents"][-1]["parts"]
            video = next((p.get("inlineData") or p.get("inline_data"))["data"] for p in parts
                         if "inlineData" in p or "inline_data" in p)
            query = [p["text"] for p in parts if "text" in p][-1]
            # google-genai sends the bytes URL-safe base64-encoded (- and _); this also reads the standard
            # alphabet, and pads what the SDK may leave unpadded
            raw = base64.urlsafe_b64decode(video + "=" * (-len(video) % 4))
            key = f"{hashlib.sha256(raw).hexdigest()}:{query}"
            text = hub.teacher.get(key, "I cannot tell.")  # an unknown video: an answer with no span
            reply = {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP"}],
                     "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 50, "totalTokenCount": 1050},
                     "modelVersion": "gemini-rehearsal"}
            self._send(200, json.dumps(reply).encode(), {"Content-Type": "application/json"})

        def do_GET(self):
            self._route(head=False)

        def do_HEAD(self):
            self._route(head=True)

    return H


# -----------------------------------------------------------------------------
# The miniature world

# Where each miniature video goes: (hub repo, folder, archive members' directory, archives). An archive
# spec is (file name, number of split parts); "chunk" specs are Grounded-VideoLLM's zip chunks. The
# decoys are archives the recipe must NOT download (originals beside a 3 fps re-encode, cropped clips).
TRAIN = {  # source: (videos, archives holding the originals under videos/, decoys)
    "didemo": (2, [("videos.tar.gz", 2)], []),
    "queryd": (2, [("videos_3fps_480_noaudio.tar.gz", 1)], [("videos.tar.gz", 2)]),
    "tacos": (1, [("videos.tar.gz", 1)], []),
    "hirest": (1, [("videos.tar.gz", 2)], [("videos_crop_3fps_480_noaudio.tar.gz", 1)]),
    "internvid_vtime": (1, [("videos.tar.gz", 1)], [("videos_crop_3fps_480_noaudio.tar.gz", 2)]),
}
AUTHORS_ROOT = "/opt/tiger/video-r1/data"  # where TVG-R1's download scripts put the data (a guess at the paths' form)
VIDEOMIND, GVLLM, TVG_DATA = "yeliudev/VideoMind-Dataset", "WHB139426/Grounded-VideoLLM", "RuizheChen/TVG_processed_data"
MODEL_ID = "Qwen/Qwen2.5-VL-7B-Instruct"


def _pack_tar(members: dict[str, Path], out: Path, parts: int) -> list[Path]:
    """A .tar.gz of `members` (archive name -> file), split into `parts` byte ranges named .00, .01, ...
    like VideoMind's (or one file when parts == 1)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, src in sorted(members.items()):
            t.add(src, arcname=name)
    raw = buf.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    if parts == 1:
        out.write_bytes(raw)
        return [out]
    step = -(-len(raw) // parts)
    files = []
    for i in range(parts):
        files.append(out.with_name(f"{out.name}.{i:02d}"))
        files[-1].write_bytes(raw[i * step:(i + 1) * step])
    return files


def _pack_zip(members: dict[str, Path], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, src in sorted(members.items()):
            z.write(src, arcname=name)


def build(out: str, seed: int = 0) -> dict:
    """Write the miniature world to OUT: OUT/hub (served), OUT/bench (benchmark annotation files).
    Returns a summary dict (also written to OUT/world.json)."""
    import annotate
    import data
    import model

    out = Path(out)
    if (out / "world.json").is_file():  # built already (the build is deterministic)
        return json.loads((out / "world.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    hub, bench, scratch = out / "hub", out / "bench", out / "scratch"
    vm, gv, td = hub / "datasets" / VIDEOMIND, hub / "datasets" / GVLLM, hub / "datasets" / TVG_DATA

    # Synthetic videos with known events: each gives up to 3 queries (data.synth_one).
    counter = iter(range(10 ** 6))
    (scratch / "videos").mkdir(parents=True)

    def videos(n: int) -> list[tuple[Path, list]]:  # [(mp4 in scratch, its samples)]
        made = []
        for _ in range(n):
            samples = data.synth_one(next(counter), seed, scratch)
            made.append((scratch / samples[0].video, samples))
        return made

    # Training sources: the JSON's paths name the originals under <source>/videos/, as TVG-R1's do.
    train_samples = []  # (record for the JSON, Sample)
    for source, (n, archives, decoys) in TRAIN.items():
        made = videos(n)
        members_orig = {f"videos/{source}_{i}.mp4": p for i, (p, _) in enumerate(made)}
        for name, parts in archives + decoys:
            level = name.split(".tar.gz")[0]  # videos, videos_3fps_480_noaudio, videos_crop_...
            members = {k.replace("videos/", f"{level}/", 1): v for k, v in members_orig.items()}
            _pack_tar(members, vm / source / name, parts)
        for i, (mp4, samples) in enumerate(made):
            for s in samples:
                train_samples.append((f"{AUTHORS_ROOT}/{source}/videos/{source}_{i}.mp4", source, s, mp4))

    # Benchmarks' videos: Charades-STA, ActivityNet and QVHighlights (3 fps re-encodes; the originals are
    # decoys), NExT-QA (originals, its only version). ReXTime reads ActivityNet and QVHighlights.
    charades, anet, qvh, nextqa = videos(2), videos(2), videos(1), videos(2)
    cha_ids = [f"CH{i:03d}" for i in range(len(charades))]
    anet_ids = [f"v_rehearsal{i:02d}" for i in range(len(anet))]  # 13 characters, like ActivityNet's
    qvh_ids = [f"qvhYoutube{i}_30.0_180.0" for i in range(len(qvh))]
    nq_ids = [f"{1000 + i}" for i in range(len(nextqa))]
    nq_paths = [f"0101/{5550 + i}" for i in range(len(nextqa))]
    for folder, ids, made, decoy in (("charades_sta", cha_ids, charades, ("videos.tar.gz", 2)),
                                     ("activitynet", anet_ids, anet, ("videos.tar.gz", 1)),
                                     ("qvhighlights", qvh_ids, qvh, None)):
        members = {f"videos_3fps_480_noaudio/{i}.mp4": p for i, (p, _) in zip(ids, made)}
        _pack_tar(members, vm / folder / "videos_3fps_480_noaudio.tar.gz", 2 if folder == "activitynet" else 1)
        if decoy:
            _pack_tar({k.replace("videos_3fps_480_noaudio", "videos"): v for k, v in members.items()},
                      vm / folder / decoy[0], decoy[1])
    _pack_tar({f"videos/{p}.mp4": src for p, (src, _) in zip(nq_paths, nextqa)}, vm / "nextqa" / "videos.tar.gz", 1)
    (vm / "charades_sta" / "durations.json").write_text(
        json.dumps({i: ss[0].duration for i, (_, ss) in zip(cha_ids, charades)}))
    (vm / "cosmo_cap").mkdir(parents=True)  # a source the recipe does not read at all
    _pack_tar({"videos/x.mp4": charades[0][0]}, vm / "cosmo_cap" / "videos.tar.gz", 1)

    # Grounded-VideoLLM's zip chunks of ActivityNet and QVHighlights videos: the 16K query-grounding
    # samples. By default the recipe reads the same videos from VideoMind's 3 fps sets instead.
    for i, (vid, (p, _)) in enumerate(zip(anet_ids, anet)):
        _pack_zip({f"{vid}.mp4": p}, gv / "activitynet" / f"chunk_{i + 1}.zip")
    _pack_zip({f"{qvh_ids[0]}.mp4": qvh[0][0]}, gv / "qvhighlights" / "chunk_1.zip")
    for vid, (mp4, samples) in zip(anet_ids + qvh_ids, anet + qvh):
        sub = "activitynet" if vid.startswith("v_") else "qvhighlights"
        train_samples.append((f"{AUTHORS_ROOT}/GroundedVLLM/{sub}/{vid}.mp4", "grounded_videollm", samples[0], mp4))

    # TVG-R1's processed files: every other training sample goes to the cold-start file (with the
    # teacher's reasoning, under a field name the converter has to detect) and the rest to the RL file.
    # For our own annotation (GEMINI_API_KEY, which ABLATIONS=1 needs): the raw training file (every
    # sample, no reasoning: TRAIN_JSON) and the Gemini stand-in's answers, the captions teacher's with
    # 30% deliberate mistakes so that the IoU split fills the cold start, the RL set and the dropped.
    cold, rl, raw, teacher = [], [], [], {}
    for k, (path, source, s, mp4) in enumerate(train_samples):
        rec = {"problem": s.query, "choices": "", "video": path, "video_length": s.duration,
               "gt_frame": s.spans[0], "ground_truth": s.spans[0], "dataset": source}
        raw.append(rec)
        teacher[f"{hashlib.sha256(mp4.read_bytes()).hexdigest()}:{s.query}"] = annotate.caption_answer(s, 0.3, seed)
        if k % 2 == 0:
            cold.append(dict(rec, gemini_output=annotate.caption_answer(s, noise=0.0, seed=seed)))
        else:
            rl.append(rec)
    td.mkdir(parents=True, exist_ok=True)
    (td / "TVG_ColdStart.json").write_text(json.dumps(cold, indent=1))
    (td / "TVG_RL.json").write_text(json.dumps(rl, indent=1))
    (out / "train_raw.json").write_text(json.dumps(raw, indent=1))
    (out / "teacher.json").write_text(json.dumps(teacher, indent=1))

    # The three benchmarks' annotation files, in their real formats.
    (bench / "charades_sta").mkdir(parents=True)
    (bench / "charades_sta" / "charades_sta_test.txt").write_text("".join(
        f"{vid} {a:.1f} {b:.1f}##{s.query}.\n" for vid, (_, ss) in zip(cha_ids, charades) for s in ss[:2]
        for a, b in s.spans))
    (bench / "nextgqa").mkdir()
    header = "video_id,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n"
    rows = [f"{vid},{int(ss[0].duration * 4)},112,112,{s.query},yes,{q},TN,yes,no,maybe,never,always\n"
            for vid, (_, ss) in zip(nq_ids, nextqa) for q, s in enumerate(ss[:2])]
    (bench / "nextgqa" / "test.csv").write_text(header + "".join(rows))
    (bench / "nextgqa" / "gsub_test.json").write_text(json.dumps(
        {vid: {"duration": round(ss[0].duration), "location": {str(q): s.spans for q, s in enumerate(ss[:2])},
               "fps": 4.0} for vid, (_, ss) in zip(nq_ids, nextqa)}))
    (bench / "nextgqa" / "map_vid_vidorID.json").write_text(json.dumps(dict(zip(nq_ids, nq_paths))))
    (bench / "rextime").mkdir()
    (bench / "rextime" / "rextime_val.jsonl").write_text("".join(
        json.dumps({"qid": f"rehearsal{n}_{q}", "query": s.query, "duration": s.duration, "vid": vid,
                    "relevant_windows": s.spans}) + "\n"
        for n, (vid, (_, ss)) in enumerate(zip(anet_ids + qvh_ids, anet + qvh)) for q, s in enumerate(ss[:2])))

    # The model, under the 7B's name: the tiny random Qwen2.5-VL, saved like a hub checkpoint.
    model.build_tiny(str(hub / "models" / MODEL_ID), hidden=64, layers=2, heads=2, vision_hidden=32, vision_depth=1)
    shutil.rmtree(scratch)
    summary = {"train_samples": len(train_samples), "coldstart": len(cold), "rl": len(rl),
               "bench": {"charades_sta": sum(1 for _ in open(bench / "charades_sta" / "charades_sta_test.txt")),
                         "nextgqa": len(rows), "rextime": sum(1 for _ in open(bench / "rextime" / "rextime_val.jsonl"))},
               "repos": [VIDEOMIND, GVLLM, TVG_DATA, MODEL_ID]}
    (out / "world.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the docstring of rehearsal.py.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the miniature world (hub repos + benchmark files)")
    b.add_argument("--out", required=True, help="output directory (hub/, bench/, world.json)")
    b.add_argument("--seed", type=int, default=0, help="seed of the synthetic videos")
    s = sub.add_parser("serve", help="serve a hub directory in the Hugging Face Hub's protocol on 127.0.0.1")
    s.add_argument("--root", required=True, help="the hub directory ({models,datasets}/OWNER/NAME/...)")
    s.add_argument("--port", type=int, default=0, help="port (0: a free one)")
    s.add_argument("--port-file", default=None, help="write the chosen port here once listening")
    s.add_argument("--teacher", default=None,
                   help="also answer Gemini generateContent requests from this file (build's teacher.json)")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        summary = build(a.out, a.seed)
        print(f"miniature world in {a.out}: {json.dumps(summary)}")
        return
    with Hub(a.root, a.port, teacher=a.teacher) as hub:
        if a.port_file:
            tmp = a.port_file + ".tmp"
            Path(tmp).write_text(str(hub.server.server_address[1]))
            os.replace(tmp, a.port_file)
        print(f"hub stand-in serving {a.root} at {hub.url} (requests logged to {hub.log})", flush=True)
        try:
            hub.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
