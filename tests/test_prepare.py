"""prepare.py and the released data as released: which archives the recipe downloads (through rehearsal.py's
local stand-in for the hub, which speaks huggingface_hub's protocol), idempotent download + extraction
after a crash, videos laid where the readers look, the cold-start reasoning read from TVG-R1's files,
and `prepare.py check`. Also: the repo stands alone (no path outside it)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

import data
import prepare
import rehearsal

PY = sys.executable


# -----------------------------------------------------------------------------
# The plan: pure, from a listing


def listing(*paths):
    return {p: 1000 + i for i, p in enumerate(paths)}


FULL = listing(
    # training sources: 3 fps beside originals, originals only, cropped clips (never), several parts
    "didemo/videos.tar.gz.00", "didemo/videos.tar.gz.01", "didemo/train_data.json",
    "queryd/videos.tar.gz.00", "queryd/videos.tar.gz.01", "queryd/videos_3fps_480_noaudio.tar.gz",
    "tacos/videos.tar.gz", "hirest/videos.tar.gz.00", "hirest/videos_crop_3fps_480_noaudio.tar.gz.00",
    *[f"internvid_vtime/videos.tar.gz.{i:02d}" for i in range(11)],
    "internvid_vtime/videos_crop_3fps_480_noaudio.tar.gz.00",
    # benchmarks
    "charades_sta/videos.tar.gz.00", "charades_sta/videos_3fps_480_noaudio.tar.gz", "charades_sta/durations.json",
    "activitynet/videos.tar.gz.00", "activitynet/videos_3fps_480_noaudio.tar.gz.00",
    "activitynet/videos_3fps_480_noaudio.tar.gz.01", "qvhighlights/videos_3fps_480_noaudio.tar.gz.00",
    "nextqa/videos.tar.gz", "cosmo_cap/videos.tar.gz.00")
GV = listing("activitynet/chunk_1.zip", "activitynet/chunk_10.zip", "activitynet/chunk_2.zip",
             "qvhighlights/chunk_1.zip", "DiDeMo/chunk_1.zip")


def test_plan_reads_only_what_the_recipe_needs():
    items = prepare.plan(FULL, None, originals=False)
    names = [it.name for it in items]
    assert names == ["didemo/videos.tar.gz", "tacos/videos.tar.gz", "queryd/videos_3fps_480_noaudio.tar.gz",
                     "hirest/videos.tar.gz", "internvid_vtime/videos.tar.gz",
                     "charades_sta/videos_3fps_480_noaudio.tar.gz", "activitynet/videos_3fps_480_noaudio.tar.gz",
                     "qvhighlights/videos_3fps_480_noaudio.tar.gz", "nextqa/videos.tar.gz", "charades_sta/durations.json"]
    parts = {it.name: it.files for it in items}
    assert parts["internvid_vtime/videos.tar.gz"] == [f"internvid_vtime/videos.tar.gz.{i:02d}" for i in range(11)]
    assert parts["didemo/videos.tar.gz"] == ["didemo/videos.tar.gz.00", "didemo/videos.tar.gz.01"]
    assert items[0].size == FULL["didemo/videos.tar.gz.00"] + FULL["didemo/videos.tar.gz.01"]
    assert not any("crop" in f or "cosmo" in f for it in items for f in it.files)


def test_plan_with_originals_takes_tvg_r1s_downloads():
    items = prepare.plan(FULL, GV, originals=True)
    names = [it.name for it in items]
    assert "queryd/videos.tar.gz" in names and "queryd/videos_3fps_480_noaudio.tar.gz" not in names
    # the benchmarks keep the 3 fps sets the scorer reads; the chunks come in numeric order
    assert "charades_sta/videos_3fps_480_noaudio.tar.gz" in names
    chunks = [it.name for it in items if it.repo == prepare.GVLLM]
    assert chunks == ["activitynet/chunk_1.zip", "activitynet/chunk_2.zip", "activitynet/chunk_10.zip",
                      "qvhighlights/chunk_1.zip"]
    assert all(it.local == "GroundedVLLM" for it in items if it.repo == prepare.GVLLM)


def test_plan_names_the_missing_source():
    without = {k: v for k, v in FULL.items() if not k.startswith("tacos/")}
    with pytest.raises(ValueError, match=r"no videos_3fps_480_noaudio.tar.gz\[.NN\] or videos.tar.gz\[.NN\] under "
                                         r"tacos/ \(files there: none\)"):
        prepare.plan(without, None, originals=False)
    only_crop = dict(FULL, **{"tacos/videos_crop_3fps_480_noaudio.tar.gz": 5})
    del only_crop["tacos/videos.tar.gz"]
    with pytest.raises(ValueError, match="files there: tacos/videos_crop_3fps_480_noaudio.tar.gz"):
        prepare.plan(only_crop, None, originals=False)


# -----------------------------------------------------------------------------
# Through the hub stand-in: the miniature world of `run.sh paper --rehearsal`


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    rehearsal.build(str(out))
    return out


@pytest.fixture
def hub(world, tmp_path):
    root = tmp_path / "hub"
    shutil.copytree(world / "hub", root)  # tests may hide files from the hub
    with rehearsal.Hub(root, log=tmp_path / "requests.jsonl") as h:
        yield h


def run_prepare(hub, tmp_path, *args, check=True):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    p = subprocess.run([PY, "prepare.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"prepare.py {args} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def requests(hub) -> list[dict]:
    return [json.loads(ln) for ln in hub.log.read_text().splitlines()] if hub.log.exists() else []


def downloaded(reqs) -> list[str]:
    return [r["path"].split("/resolve/main/", 1)[1] for r in reqs if r["method"] == "GET" and "/resolve/" in r["path"]]


def test_videos_download_only_what_is_read_and_resume_after_a_crash(hub, tmp_path):
    root = tmp_path / "videos"
    # A failure midway: the 9th archive of the plan (NExT-QA's) cannot be fetched in the first run.
    hub.unavailable.add("nextqa/videos.tar.gz")
    p = run_prepare(hub, tmp_path, "videos", "--root", root, check=False)
    assert p.returncode != 0 and "nextqa/videos.tar.gz" in p.stdout + p.stderr and "Traceback" not in p.stderr
    first = downloaded(requests(hub))
    assert len(list((root / ".prepare").rglob("*.done"))) == 8  # the archives before it are finished and marked
    hub.unavailable.clear()

    n = len(requests(hub))
    run_prepare(hub, tmp_path, "videos", "--root", root)
    second = downloaded(requests(hub)[n:])
    # Nothing finished is fetched again; the rest is.
    assert not set(second) & {f for f in first if "nextqa" not in f}
    assert sorted(set(first) | set(second)) == sorted([
        "activitynet/videos_3fps_480_noaudio.tar.gz.00", "activitynet/videos_3fps_480_noaudio.tar.gz.01",
        "charades_sta/durations.json", "charades_sta/videos_3fps_480_noaudio.tar.gz", "didemo/videos.tar.gz.00",
        "didemo/videos.tar.gz.01", "hirest/videos.tar.gz.00", "hirest/videos.tar.gz.01",
        "internvid_vtime/videos.tar.gz", "nextqa/videos.tar.gz", "queryd/videos_3fps_480_noaudio.tar.gz",
        "qvhighlights/videos_3fps_480_noaudio.tar.gz", "tacos/videos.tar.gz"])  # no decoy, no Grounded-VideoLLM

    # Extracted where the readers look, the archives gone (as TVG-R1's script leaves it).
    assert (root / "queryd" / "videos_3fps_480_noaudio" / "queryd_1.mp4").is_file()
    assert (root / "nextqa" / "videos" / "0101" / "5551.mp4").is_file()
    assert not [p for p in root.rglob("*.tar.gz*") if not {".cache", ".prepare"} & set(p.parts)]

    # A third run has nothing to do: not one request, not even the listing.
    n = len(requests(hub))
    p = run_prepare(hub, tmp_path, "videos", "--root", root)
    assert "nothing to do" in p.stdout and len(requests(hub)) == n

    # --list shows the plan with sizes; --originals adds Grounded-VideoLLM's chunks
    p = run_prepare(hub, tmp_path, "videos", "--root", root, "--originals", "--list")
    assert "todo" in p.stdout and "WHB139426/Grounded-VideoLLM/activitynet/chunk_2.zip" in p.stdout
    assert "done" in p.stdout and "queryd/videos.tar.gz (2 parts)" in p.stdout


def test_released_files_convert_with_their_reasoning_and_videos(hub, tmp_path, world):
    root = tmp_path / "videos"
    run_prepare(hub, tmp_path, "videos", "--root", root)
    run_prepare(hub, tmp_path, "get", "--repo", "RuizheChen/TVG_processed_data", "--repo-type", "dataset",
                "--out", tmp_path / "hf")
    n = len(requests(hub))
    p = run_prepare(hub, tmp_path, "get", "--repo", "RuizheChen/TVG_processed_data", "--repo-type", "dataset",
                    "--out", tmp_path / "hf")
    assert "downloaded already" in p.stdout and len(requests(hub)) == n

    cold = data.read_tvg_r1(tmp_path / "hf" / "TVG_ColdStart.json", root, require_cot=True)
    rl = data.read_tvg_r1(tmp_path / "hf" / "TVG_RL.json", root, cot_field="none")
    # The authors' absolute paths (/opt/tiger/video-r1/data/...) resolve under our root, to the 3 fps
    # re-encode where that is what was downloaded, and to VideoMind's ActivityNet set for the
    # Grounded-VideoLLM samples.
    for s in cold + rl:
        assert os.path.isfile(s.video) and s.video.startswith(str(root)), s.video
    assert {Path(s.video).parent.name for s in cold + rl} == {"videos", "videos_3fps_480_noaudio"}
    assert any("/activitynet/videos_3fps_480_noaudio/" in s.video for s in cold + rl)
    # The reasoning is the teacher's <think> text and its span, not the tags
    assert all(s.cot and "<think>" not in s.cot and "<time>" not in s.cot for s in cold)
    assert all(s.answer is not None for s in cold) and all(s.cot is None for s in rl)
    src = json.loads((tmp_path / "hf" / "TVG_ColdStart.json").read_text())[0]
    assert data.format_answer(cold[0].cot, cold[0].answer) == src["gemini_output"]

    # The benchmark readers find VideoMind's layout
    bench = world / "bench"
    for s in data.read_rextime(bench / "rextime" / "rextime_val.jsonl", root):
        assert os.path.isfile(s.video) and "/videos_3fps_480_noaudio/" in s.video
    cha = data.read_charades_sta(bench / "charades_sta" / "charades_sta_test.txt",
                                 root / "charades_sta" / "videos_3fps_480_noaudio", root / "charades_sta" / "durations.json")
    assert all(os.path.isfile(s.video) and s.duration for s in cha)
    assert all(os.path.isfile(s.video) for s in data.read_nextgqa(bench / "nextgqa" / "test.csv", root / "nextqa" / "videos"))


def test_model_download_is_the_hub_checkpoint_and_not_repeated(hub, tmp_path):
    out = tmp_path / "base_model"
    run_prepare(hub, tmp_path, "get", "--repo", rehearsal.MODEL_ID, "--out", out)
    import model
    m = model.load_model(str(out))  # the same loader as every stage
    assert m.config.model_type == "qwen2_5_vl" and (out / "tokenizer.json").is_file()
    n = len(requests(hub))
    run_prepare(hub, tmp_path, "get", "--repo", rehearsal.MODEL_ID, "--out", out)
    assert len(requests(hub)) == n
    p = run_prepare(hub, tmp_path, "get", "--repo", "nobody/nothing", "--out", tmp_path / "x", check=False)
    assert p.returncode != 0 and "nobody/nothing" in p.stderr and "Traceback" not in p.stderr


# -----------------------------------------------------------------------------
# The cold-start reasoning: detected, named, or a clear error


def _write(tmp_path, records, name="cold.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


BASE = {"problem": "a dog runs", "video": "v.mp4", "video_length": 20, "gt_frame": [2, 6], "dataset": "didemo"}


def test_reasoning_field_detected_named_or_refused(tmp_path):
    # a known name, without tags: all of it is reasoning, no span of the teacher's own
    s = data.read_tvg_r1(_write(tmp_path, [dict(BASE, reasoning="The dog starts at 2 s.")]), require_cot=True)[0]
    assert (s.cot, s.answer) == ("The dog starts at 2 s.", None)
    # a chat list (LLaVA's conversations): the last assistant turn
    conv = [{"from": "human", "value": "<video> a dog runs"}, {"from": "gpt", "value": "<think>runs</think> <time>[2, 5]</time>"}]
    s = data.read_tvg_r1(_write(tmp_path, [dict(BASE, conversations=conv)]), require_cot=True)[0]
    assert (s.cot, s.answer) == ("runs", [2.0, 5.0])
    # an unknown name with no tags: not found; --cot-field names it; the error lists the fields
    path = _write(tmp_path, [dict(BASE, my_notes="The dog runs from 2 to 6.")])
    with pytest.raises(data.DataError, match=r"record 0: no reasoning field found \(fields: dataset, gt_frame, my_notes, "
                                             r"problem, video, video_length\); name it with --cot-field NAME"):
        data.read_tvg_r1(path, require_cot=True)
    assert data.read_tvg_r1(path)[0].cot is None  # auto without --require-cot: the RL file's case
    assert data.read_tvg_r1(path, cot_field="my_notes")[0].cot == "The dog runs from 2 to 6."
    # once a field is chosen, a record without it is named
    path = _write(tmp_path, [dict(BASE, my_notes="x"), BASE])
    with pytest.raises(data.DataError, match=r"record 1: no reasoning in field 'my_notes'"):
        data.read_tvg_r1(path, cot_field="my_notes")


def test_convert_cli_require_cot_and_cot_field(tmp_path):
    path = _write(tmp_path, [dict(BASE, notes="<think>It runs.</think> <time>[2, 6]</time>")])
    p = subprocess.run([PY, "data.py", "convert", "--format", "tvg_r1", "--input", path, "--require-cot",
                        "--out", tmp_path / "out.jsonl"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "reasoning read from field 'notes'" in p.stdout
    assert json.loads((tmp_path / "out.jsonl").read_text())["cot"] == "It runs."
    p = subprocess.run([PY, "data.py", "convert", "--format", "tvg_r1", "--input", _write(tmp_path, [BASE], "rl.json"),
                        "--require-cot", "--out", tmp_path / "x.jsonl"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "no reasoning field found" in p.stderr and "rl.json: record 0" in p.stderr


def test_resolve_video_prefers_the_longest_existing_tail(tmp_path):
    for rel in ("didemo/videos_3fps_480_noaudio/a.mp4", "queryd/videos/b.mp4", "b.mp4",
                "activitynet/videos_3fps_480_noaudio/v_x.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    r = lambda p: data.resolve_video(p, tmp_path)  # noqa: E731
    assert r("/opt/tiger/video-r1/data/didemo/videos/a.mkv") == str(tmp_path / "didemo/videos_3fps_480_noaudio/a.mp4")
    assert r("/elsewhere/queryd/videos/b.mp4") == str(tmp_path / "queryd/videos/b.mp4")  # not the top-level b.mp4
    assert r("data/GroundedVLLM/activitynet/v_x.mp4") == str(tmp_path / "activitynet/videos_3fps_480_noaudio/v_x.mp4")
    assert r("/opt/data/tacos/videos/c.mp4") == str(tmp_path / "opt/data/tacos/videos/c.mp4")  # missing: under root
    assert data.resolve_video("rel/c.mp4", None) == "rel/c.mp4"


# -----------------------------------------------------------------------------
# check: every video decodes, the bad ones listed with the reason


def test_check_lists_bad_videos_and_drops_them_on_request(synth_dir, tmp_path):
    good = data.read_jsonl(synth_dir / "train.jsonl")[0]
    (tmp_path / "empty.mp4").write_bytes(b"")
    raw = Path(good.video).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(raw[: len(raw) // 3])
    late = data.Sample(id="late", video=good.video, duration=good.duration, query="q", spans=[[500.0, 510.0]])
    samples = [good, data.Sample(id="empty", video=str(tmp_path / "empty.mp4"), duration=5, query="q", spans=[[0, 1]]),
               data.Sample(id="cut", video=str(tmp_path / "cut.mp4"), duration=5, query="q", spans=[[0, 1]]),
               data.Sample(id="gone", video=str(tmp_path / "gone.mp4"), duration=5, query="q", spans=[[0, 1]]), late]
    data.write_jsonl(tmp_path / "in.jsonl", samples)
    args = ["prepare.py", "check", "--data", tmp_path / "in.jsonl", "--out", tmp_path / "ok.jsonl", "--workers", "2",
            "--nframes", "8", "--max-pixels", "3136", "--min-pixels", "3136"]
    p = subprocess.run([PY, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "4 bad video(s)" in p.stderr and "--drop-bad" in p.stderr
    assert not (tmp_path / "ok.jsonl").exists()
    rows = [ln.split("\t") for ln in (tmp_path / "in.jsonl.bad_videos.tsv").read_text().splitlines()[1:]]
    reasons = {r[0]: r[2] for r in rows}
    assert set(reasons) == {"empty", "cut", "gone", "late"}
    assert "not found" in reasons["gone"] and "cannot decode" in reasons["empty"]
    assert "starts at 500.00 s" in reasons["late"]
    p = subprocess.run([PY, *map(str, args), "--drop-bad"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "dropped 4" in p.stdout
    assert [s.id for s in data.read_jsonl(tmp_path / "ok.jsonl")] == [good.id]


def test_check_decodes_each_video_once_across_files(synth_dir, tmp_path):
    """Several --data files in one call (run.sh: coldstart, rl and, with ABLATIONS=1, their unfiltered
    supersets): a video shared by samples and files is decoded once; each file gets its own --out and
    bad list, and a bad video fails every sample that uses it, named by that sample."""
    train = data.read_jsonl(synth_dir / "train.jsonl")
    (tmp_path / "empty.mp4").write_bytes(b"")
    empty = [data.Sample(id=f"empty{i}", video=str(tmp_path / "empty.mp4"), duration=5, query="q", spans=[[0, 1]])
             for i in range(2)]
    a = train[:6] + empty[:1]            # 2 synth videos x 3 queries, and the empty file
    b = train[:9] + empty                # a superset: one more synth video, the empty file twice
    data.write_jsonl(tmp_path / "a.jsonl", a)
    data.write_jsonl(tmp_path / "b.jsonl", b)
    args = ["prepare.py", "check", "--data", tmp_path / "a.jsonl", tmp_path / "b.jsonl",
            "--out", tmp_path / "a_ok.jsonl", tmp_path / "b_ok.jsonl", "--workers", "2", "--nframes", "8",
            "--max-pixels", "3136", "--min-pixels", "3136"]
    p = subprocess.run([PY, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert len({s.video for s in b}) == 4
    assert "decoded 4 distinct video(s) for 18 samples in 2 file(s)" in p.stdout  # not 18 decodes
    assert p.returncode == 1 and "1 bad video(s) in" in p.stderr and "2 bad video(s) in" in p.stderr
    assert not (tmp_path / "a_ok.jsonl").exists() and not (tmp_path / "b_ok.jsonl").exists()
    rows = [ln.split("\t") for ln in (tmp_path / "b.jsonl.bad_videos.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["empty0", "empty1"]
    assert "sample empty1: cannot decode" in rows[1][2]  # the reason names its own sample
    p = subprocess.run([PY, *map(str, args), "--drop-bad"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert [s.id for s in data.read_jsonl(tmp_path / "a_ok.jsonl")] == [s.id for s in train[:6]]
    assert [s.id for s in data.read_jsonl(tmp_path / "b_ok.jsonl")] == [s.id for s in train[:9]]
    p = subprocess.run([PY, *map(str, args[:7]), "--drop-bad"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "--out needs one file per --data file: got 1 for 2" in p.stderr


# -----------------------------------------------------------------------------
# The repo stands alone


def test_no_project_file_reads_outside_the_repo():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    needles = ("../" + "shared", "shared" + "/data")  # spelled in pieces so this file does not match itself
    hits = [f for f in files if (ROOT / f).is_file() and f.endswith((".py", ".sh", ".md", ".txt", ".json", ".cfg"))
            and any(n in (ROOT / f).read_text(errors="ignore") for n in needles)]
    assert hits == []


def _tar_gz(path: Path, members: list[tuple[str, str]]) -> Path:
    """A .tar.gz of (name, kind) members: kind "file", or "sym:TARGET" for a symlink."""
    import io
    import tarfile
    with tarfile.open(path, "w:gz") as tar:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind.startswith("sym:"):
                info.type, info.linkname = tarfile.SYMTYPE, kind[4:]
                tar.addfile(info)
            else:
                info.size = 3
                tar.addfile(info, io.BytesIO(b"mp4"))
    return path


@pytest.mark.parametrize("name,kind", [("../evil.mp4", "file"), ("ABS/evil.mp4", "file"),
                                       ("a/../../evil.mp4", "file"), ("link", "sym:../../etc/passwd"),
                                       ("link", "sym:/etc/passwd")])
def test_extract_refuses_members_outside_the_destination(tmp_path, name, kind):
    """Both ways of refusing (tarfile's "data" filter where Python has it, our check where it does not:
    Debian 12's Python 3.11.2 has no filter) refuse what would land outside the videos folder."""
    import tarfile
    name = name.replace("ABS", str(tmp_path))  # an absolute path
    archive = _tar_gz(tmp_path / "videos.tar.gz", [("ok/a.mp4", "file"), (name, kind)])
    dest = tmp_path / "out" / "videos"
    dest.mkdir(parents=True)
    try:
        prepare.extract([archive], dest)
    except (SystemExit, tarfile.TarError):
        pass
    else:  # only tarfile's filter lets one through, an absolute name, stripped of its "/" to land inside
        assert name.startswith("/") and (dest / name.lstrip("/")).is_file()
    with tarfile.open(archive) as tar:
        bad = tar.getmember(name)
    with pytest.raises(SystemExit, match="outside"):
        prepare._checked_member(bad, dest, archive)
    assert not (tmp_path / "out" / "evil.mp4").exists() and not (tmp_path / "evil.mp4").exists()
    # what stays inside passes the check and is extracted
    good = _tar_gz(tmp_path / "good.tar.gz", [("ok/b.mp4", "file"), ("ok/c.mp4", "sym:b.mp4")])
    with tarfile.open(good) as tar:
        assert all(prepare._checked_member(m, dest, good) is m for m in tar.getmembers())
    assert prepare.extract([good], dest) == 1 and (dest / "ok" / "b.mp4").read_bytes() == b"mp4"
