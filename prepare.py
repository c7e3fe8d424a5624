r"""The paper preset's inputs, as released: weights, TVG-R1's files and the videos from the Hugging Face Hub,
extracted where the readers look, then every referenced video decoded once before training starts.

    python prepare.py get --repo Qwen/Qwen2.5-VL-7B-Instruct --out runs/paper/base_model
    python prepare.py get --repo RuizheChen/TVG_processed_data --repo-type dataset --out runs/paper/hf
    python prepare.py videos --root runs/paper/videos --list       # what would be downloaded, with sizes
    python prepare.py videos --root runs/paper/videos              # download + extract (resumable)
    python prepare.py check --data runs/paper/data/rl_all.jsonl --out runs/paper/data/rl.jsonl [--drop-bad]

`bash run.sh paper` runs them in this order. They talk to the hub through huggingface_hub
(`HF_ENDPOINT`, `HF_TOKEN` as usual; `run.sh paper --rehearsal` points HF_ENDPOINT at rehearsal.py's
local stand-in). Every step can be re-run after a crash: finished work is never done again.

What `videos` downloads (only what the recipe reads, in VideoMind-Dataset's layout under --root):
* training, the 40K instance-grounding samples (`didemo`, `tacos`, `queryd`, `hirest`,
  `internvid_vtime`): each source's `videos_3fps_480_noaudio` re-encode when the hub has one, else its
  original `videos.tar.gz[.NN]`. A 3 fps, 480p copy has the same seconds and more pixels and frames
  than 64 frames of at most 128*28*28 pixels need; queryd's is 33.2 GB against 83.6 GB of originals.
  Cropped clips (`videos_crop_*`) are never used: their time axis is not the annotations' (TVG-R1's
  own script deletes them too). `--originals` takes every source's originals, as TVG-R1 did.
* training, the 16K query-grounding samples: ActivityNet and QVHighlights videos. By default they are
  read from VideoMind's 3 fps `activitynet` and `qvhighlights` sets, which the ReXTime benchmark needs
  anyway (`data.VIDEO_DIR_ALIASES` maps the paths); `--originals` downloads Grounded-VideoLLM's
  `activitynet/chunk_N.zip` and `qvhighlights/chunk_N.zip` instead (111.8 + 143.7 GB).
* evaluation: `charades_sta` (3 fps + durations.json), `activitynet` and `qvhighlights` (3 fps, for
  ReXTime), `nextqa` (its originals, the only version; NExT-GQA's videos).

Resumable and idempotent: each archive (all parts of a split `.tar.gz.NN`, or one zip chunk) is
downloaded (huggingface_hub resumes a partial file), extracted in its folder as TVG-R1's script does
(the parts are streamed through one gzip reader, never concatenated on disk), and then marked done in
ROOT/.prepare/; its parts are deleted unless --keep-archives. A re-run skips every marked archive without
downloading or extracting it again, and when every archive of the plan is marked it does not even ask
the hub for the file list. Videos you already have: put them in this layout and pass `VIDEO_ROOT`
to run.sh (no download), or run `prepare.py videos --root` on them to fetch only what is missing.

`check` decodes every sample's video exactly as training will (data.load_video: the frames and pixels
given), in parallel with a progress bar, and writes the bad ones with the reason (BAD_LIST, TSV). It
stops with exit code 1 when any is bad, or with --drop-bad writes the good samples to --out and says
how many it dropped.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

VIDEOMIND = "yeliudev/VideoMind-Dataset"
GVLLM = "WHB139426/Grounded-VideoLLM"
TRAIN_SOURCES = ("didemo", "tacos", "queryd", "hirest", "internvid_vtime")
THREE_FPS = "videos_3fps_480_noaudio"
# Benchmarks' videos: folder -> archive base name. VideoMind's scorer reads the 3 fps sets; NExT-QA has
# only its originals.
EVAL_SOURCES = {"charades_sta": THREE_FPS, "activitynet": THREE_FPS, "qvhighlights": THREE_FPS, "nextqa": "videos"}
EVAL_FILES = ("charades_sta/durations.json",)
GVLLM_SOURCES = ("activitynet", "qvhighlights")


@dataclass
class Item:
    """One unit of download work: an archive (its parts) or a plain file, from one hub repo."""
    repo: str
    files: list[str]  # paths in the repo: the parts of one archive in order, or one plain file
    size: int  # bytes, all parts
    local: str  # directory under --root the repo's paths are relative to

    @property
    def name(self) -> str:  # the archive without its part suffix: "didemo/videos.tar.gz"
        return re.sub(r"\.\d+$", "", self.files[0])

    @property
    def archive(self) -> bool:
        return self.name.endswith((".tar.gz", ".zip"))


# -----------------------------------------------------------------------------
# The plan: which files of the hub's listing the recipe reads (pure: a listing in, items out)


def _groups(listing: dict[str, int], folder: str, base: str) -> list[tuple[str, list[str]]]:
    """The archives named `folder/base.tar.gz` or `folder/base.tar.gz.NN` (parts in order)."""
    pat = re.compile(rf"^{re.escape(folder)}/{re.escape(base)}\.tar\.gz(\.\d+)?$")
    parts = sorted((p for p in listing if pat.match(p)), key=lambda p: (len(p), p))
    return [(f"{folder}/{base}.tar.gz", parts)] if parts else []


def plan(videomind: dict[str, int], gvllm: dict[str, int] | None, originals: bool) -> list[Item]:
    """The download plan from the two repos' listings ({path: size}). Raises ValueError naming the
    folder when a source the recipe needs has no archive in the listing."""
    items = []

    def add(repo, listing, folder, bases, local=""):
        for base in bases:
            for _, parts in _groups(listing, folder, base):
                items.append(Item(repo, parts, sum(listing[p] for p in parts), local))
                return
        there = sorted(p for p in listing if p.startswith(folder + "/"))
        raise ValueError(f"{repo}: no {' or '.join(b + '.tar.gz[.NN]' for b in bases)} under {folder}/ "
                         f"(files there: {', '.join(there) or 'none'})")

    for src in TRAIN_SOURCES:
        add(VIDEOMIND, videomind, src, ["videos"] if originals else [THREE_FPS, "videos"])
    for src, base in EVAL_SOURCES.items():
        add(VIDEOMIND, videomind, src, [base])
    for path in EVAL_FILES:
        if path not in videomind:
            raise ValueError(f"{VIDEOMIND}: {path} is not in the listing")
        items.append(Item(VIDEOMIND, [path], videomind[path], ""))
    if originals:
        for src in GVLLM_SOURCES:
            chunks = sorted((p for p in gvllm if re.fullmatch(rf"{src}/chunk_\d+\.zip", p)),
                            key=lambda p: int(re.findall(r"\d+", p.rsplit("/", 1)[1])[0]))
            if not chunks:
                raise ValueError(f"{GVLLM}: no chunk_N.zip under {src}/")
            items += [Item(GVLLM, [c], gvllm[c], "GroundedVLLM") for c in chunks]
    return items


# -----------------------------------------------------------------------------
# Download and extract


def listing(repo: str) -> dict[str, int]:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    files = HfApi().list_repo_tree(repo, repo_type="dataset", recursive=True)
    return {f.path: f.size for f in files if isinstance(f, RepoFile)}


class Parts(io.RawIOBase):
    """The parts of a split archive read as one stream (TVG-R1's `cat videos.tar.gz.* > ...`, without
    writing the concatenation to disk). `done` counts the bytes read, for the progress bar."""

    def __init__(self, paths: list[Path], on_read=None):
        self.paths, self.i, self.f, self.on_read = list(paths), 0, None, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self.i < len(self.paths):
            if self.f is None:
                self.f = open(self.paths[self.i], "rb")
            n = self.f.readinto(buf)
            if n:
                if self.on_read:
                    self.on_read(n)
                return n
            self.f.close()
            self.f, self.i = None, self.i + 1
        return 0

    def close(self):
        if self.f:
            self.f.close()
        super().close()


def extract(parts: list[Path], dest: Path) -> int:
    """Extract one archive (split .tar.gz parts, or a zip) into `dest`; returns the number of files.
    Member names that would leave `dest` (absolute, `..`, links outside) are refused by tarfile's
    "data" filter and by zipfile's own sanitising."""
    from tqdm import tqdm
    total = sum(p.stat().st_size for p in parts)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {parts[0].name}", leave=False) as bar:
        if parts[0].suffix == ".zip":
            with zipfile.ZipFile(parts[0]) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
                z.extractall(dest)
            bar.update(total)
            return len(names)
        n = 0
        with Parts(parts, bar.update) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
            for member in tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, dest, filter="data")
                else:  # Python < 3.11.4 / 3.10.12 (Debian 12 ships 3.11.2): the same refusals, by hand
                    tar.extract(_checked_member(member, dest, parts[0]), dest)
                n += member.isfile()
        return n


def _checked_member(member: tarfile.TarInfo, dest: Path, archive: Path) -> tarfile.TarInfo:
    """What tarfile's "data" filter refuses, for Pythons without it: a member or link target outside
    `dest` (absolute, `..`), and anything but files, directories and links."""
    root = dest.resolve()

    def inside(name: str, base: Path) -> bool:
        return not os.path.isabs(name) and (base / name).resolve().is_relative_to(root)

    ok = inside(member.name, root) and (member.isfile() or member.isdir() or member.issym() or member.islnk())
    if ok and member.issym():
        ok = inside(member.linkname, (root / member.name).parent)
    elif ok and member.islnk():
        ok = inside(member.linkname, root)
    if not ok:
        raise SystemExit(f"{archive}: member {member.name!r} would be written outside {dest} or is not a "
                         f"plain file, directory or link; refusing to extract")
    return member


def marker(root: Path, item: Item) -> Path:
    return root / ".prepare" / item.repo.replace("/", "__") / (item.name + ".done")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fetch_item(root: Path, item: Item, keep_archives: bool) -> None:
    """Download one item's files (resuming partial ones), extract an archive, mark it done."""
    from huggingface_hub import hf_hub_download
    local = root / item.local
    need = item.size * (2 if item.archive else 1)  # the parts, then about as much again extracted
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(f"{root}: {free / 1e9:.1f} GB free, {item.name} needs about {need / 1e9:.1f} GB "
                      "(download + extraction); free some space or pass a --root on a larger disk")
    paths = [Path(hf_hub_download(item.repo, f, repo_type="dataset", local_dir=local)) for f in item.files]
    count = None
    if item.archive:
        count = extract(paths, paths[0].parent)
    _write_atomic(marker(root, item), json.dumps(dict(asdict(item), extracted_files=count)))
    if item.archive and not keep_archives:  # as TVG-R1's script does: the videos are what we keep
        for p in paths:
            p.unlink()


def videos_main(a) -> None:
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    plan_path = root / ".prepare" / ("plan_originals.json" if a.originals else "plan.json")
    if plan_path.is_file() and not a.list:
        items = [Item(**d) for d in json.loads(plan_path.read_text())]
        if all(marker(root, it).is_file() for it in items):
            print(f"{root}: all {len(items)} archives and files of the plan are extracted: nothing to do")
            return
    items = plan(listing(VIDEOMIND), listing(GVLLM) if a.originals else None, a.originals)
    todo = [it for it in items if not marker(root, it).is_file()]
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    print(f"{len(items)} archives/files ({gb(sum(it.size for it in items))}); {len(items) - len(todo)} done, "
          f"{len(todo)} to fetch ({gb(sum(it.size for it in todo))}) into {root}")
    if a.list:
        for it in items:
            state = "done" if marker(root, it).is_file() else "todo"
            print(f"  {state}  {gb(it.size):>10}  {it.repo}/{it.name}" + (f" ({len(it.files)} parts)" if len(it.files) > 1 else ""))
        return
    _write_atomic(plan_path, json.dumps([asdict(it) for it in items], indent=1))
    for k, it in enumerate(todo, 1):
        print(f"[{k}/{len(todo)}] {it.repo}/{it.name} ({gb(it.size)})", flush=True)
        fetch_item(root, it, a.keep_archives)
    print(f"done: videos under {root}")


def get_main(a) -> None:
    """A whole repo (or the files matching --include) into --out; a marker makes a re-run free."""
    from fnmatch import fnmatch
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.hf_api import RepoFile
    out = Path(a.out)
    done = out / ".prepare_complete"
    if done.is_file():
        print(f"{out}: {a.repo} downloaded already (remove {done} to check it against the hub again)")
        return
    files = [f.path for f in HfApi().list_repo_tree(a.repo, repo_type=a.repo_type, recursive=True)
             if isinstance(f, RepoFile) and (not a.include or any(fnmatch(f.path, pat) for pat in a.include))]
    if not files:
        sys.exit(f"error: {a.repo} has no files" + (f" matching {a.include}" if a.include else ""))
    for f in files:
        hf_hub_download(a.repo, f, repo_type=a.repo_type, local_dir=out)
    _write_atomic(done, json.dumps({"repo": a.repo, "files": files}))
    print(f"{a.repo}: {len(files)} files in {out}")


# -----------------------------------------------------------------------------
# Check: every video decodes, as training will decode it


def _decode_video(job: tuple) -> tuple[str, float | None, str | None]:
    """(video, seconds, None) when the video decodes at the training setting, else (video, None, reason).
    The reason names `first`, the first sample that uses the video."""
    import data
    video, first, nframes, max_pixels, min_pixels = job
    s = data.Sample(id=first, video=video, duration=None, query="", spans=[])  # spans: checked per sample
    try:
        _, meta = data.load_video(s, nframes, max_pixels, min_pixels)
    except Exception as e:  # the reason is reported per video; a bad file must not stop the others
        return video, None, f"{type(e).__name__}: {e}"
    # no fps in the metadata: the file's length is unknown, only the samples' durations are checked
    return video, meta["total_num_frames"] / meta["fps"] if meta.get("fps") else math.inf, None


def check_main(a) -> None:
    """Decode each distinct video of every --data file once (a video has several queries, and the
    unfiltered sets of ABLATIONS=1 hold every sample of the filtered ones), then check each sample's
    spans against its video's length, as training does (data.check_spans)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from tqdm import tqdm
    import data
    srcs = [Path(d) for d in a.data]
    if a.out and len(a.out) != len(srcs):
        sys.exit(f"error: --out needs one file per --data file: got {len(a.out)} for {len(srcs)}")
    if a.bad_list and len(srcs) > 1:
        sys.exit("error: --bad-list names one file: with several --data files each gets DATA.bad_videos.tsv")
    files, first = [], {}  # first: video -> the first sample id that uses it
    for src in srcs:
        samples = data.read_jsonl(src)  # a malformed line stops here, with file:line; video paths absolute
        lines = [data.text_line(ln, w) for w, ln in data.file_lines(src)]  # as read_jsonl splits them
        for smp in samples:
            first.setdefault(smp.video, smp.id)
        files.append((src, lines, samples))
    jobs = [(v, i, a.nframes, a.max_pixels, a.min_pixels) for v, i in first.items()]
    decoded = {}
    with ProcessPoolExecutor(max(1, min(a.workers, len(jobs))), mp_context=multiprocessing.get_context("spawn")) as ex:
        for video, seconds, why in tqdm(ex.map(_decode_video, jobs, chunksize=4), total=len(jobs),
                                        desc="check: decode", unit="video"):
            decoded[video] = (seconds, why)
    print(f"decoded {len(jobs)} distinct video(s) for {sum(len(f[2]) for f in files)} samples in {len(srcs)} file(s)")
    errors = []
    for k, (src, lines, samples) in enumerate(files):
        bad = []
        for smp in samples:
            seconds, why = decoded[smp.video]
            if why is not None:  # named after the sample that first used the video: name this one
                why = why.replace(f"sample {first[smp.video]}: ", f"sample {smp.id}: ", 1)
            else:
                try:
                    data.check_spans(smp, seconds)
                except data.DataError as e:
                    why = f"DataError: {e}"
            bad.append(why)
        n_bad = sum(w is not None for w in bad)
        bad_list = Path(a.bad_list or str(src) + ".bad_videos.tsv")
        _write_atomic(bad_list, "id\tvideo\treason\n" + "".join(
            f"{smp.id}\t{smp.video}\t{why}\n" for smp, why in zip(samples, bad) if why))
        print(f"{src}: {len(samples) - n_bad} of {len(samples)} samples have a video that decodes; "
              f"{n_bad} bad, listed in {bad_list}")
        for smp, why in [(smp, why) for smp, why in zip(samples, bad) if why][:5]:
            print(f"  {smp.id}\t{smp.video}\t{why}")
        if n_bad:
            errors.append(f"{n_bad} bad video(s) in {src}")
        if a.out and (a.drop_bad or not n_bad):
            keep = [ln for ln, why in zip(lines, bad) if not why]
            _write_atomic(Path(a.out[k]), "".join(ln + "\n" for ln in keep))
            print(f"wrote {len(keep)} samples to {a.out[k]}" + (f" (dropped {n_bad} with a bad video)" if n_bad else ""))
    if errors and not a.drop_bad:
        sys.exit(f"error: {', '.join(errors)}: fix them, or pass --drop-bad to leave their samples out")


def main(argv=None) -> None:
    import data
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the docstring of prepare.py.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("get", help="download a whole hub repo (a model, TVG-R1's files) into a directory")
    g.add_argument("--repo", required=True, help="repo id, e.g. Qwen/Qwen2.5-VL-7B-Instruct")
    g.add_argument("--repo-type", default="model", choices=["model", "dataset"], help="hub repo type")
    g.add_argument("--out", required=True, help="local directory")
    g.add_argument("--include", nargs="*", default=None, help="only the files matching these glob patterns")
    v = sub.add_parser("videos", help="download and extract the videos the recipe reads")
    v.add_argument("--root", required=True, help="videos root (VideoMind-Dataset's layout; run.sh's VIDEO_ROOT)")
    v.add_argument("--originals", action="store_true", help="original videos and Grounded-VideoLLM's zips, as "
                   "TVG-R1 downloaded them, instead of the 3 fps re-encodes")
    v.add_argument("--keep-archives", action="store_true", help="keep the archives after extracting them")
    v.add_argument("--list", action="store_true", help="print the plan with sizes and what is done; download nothing")
    c = sub.add_parser("check", help="decode every sample's video as training will; list the bad ones")
    c.add_argument("--data", required=True, nargs="+", help="Sample JSONL file(s); a video shared by samples or "
                   "files is decoded once")
    c.add_argument("--out", default=None, nargs="+", help="one per --data: write the samples whose video is "
                   "good here (atomically)")
    c.add_argument("--drop-bad", action="store_true", help="leave bad samples out of --out instead of stopping")
    c.add_argument("--bad-list", default=None, help="TSV of bad videos (default: DATA.bad_videos.tsv)")
    c.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    c.add_argument("--nframes", type=int, default=data.NFRAMES, help="frames sampled per video, as in training")
    c.add_argument("--max-pixels", type=int, default=data.MAX_PIXELS, help="max pixels per frame, as in training")
    c.add_argument("--min-pixels", type=int, default=data.MIN_PIXELS, help="min pixels per frame, as in training")
    a = ap.parse_args(argv)
    try:
        {"get": get_main, "videos": videos_main, "check": check_main}[a.cmd](a)
    except (ValueError, OSError, data.DataError) as e:  # a clear message, not a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
