"""Benchmark readers on the REAL annotation files in assets/ (counts, spot values, quirks), their
error messages on malformed input, the duration fallbacks, and the `data.py convert` / `synth` CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, ASSETS

import data
from data import DataError, read_benchmark, read_charades_sta, read_jsonl, read_nextgqa, read_rextime, read_tvg_r1

CHARADES_TXT = ASSETS / "charades_sta" / "charades_sta_test.txt"
CHARADES_JSONL = ASSETS / "charades_sta" / "charades_sta_test_taro.jsonl"
REXTIME_JSON = ASSETS / "rextime" / "rextime_val.json"
REXTIME_JSONL = ASSETS / "rextime" / "rextime_val.jsonl"
NEXTGQA_CSV = ASSETS / "nextgqa" / "test.csv"


def ids_unique(samples):
    return len({s.id for s in samples}) == len(samples)


# -----------------------------------------------------------------------------
# The real files


def test_charades_txt():
    ss = read_charades_sta(CHARADES_TXT, video_root="/videos")
    assert len(ss) == 3720 and ids_unique(ss)
    s = ss[0]
    assert (s.id, s.query, s.spans) == ("charades_0", "person turn a light on.", [[24.3, 30.4]])
    assert s.source == "charades_sta"
    assert s.video == "/videos/3MSZA.mp4"
    assert s.duration is None  # no durations file, no video: unknown, not guessed
    assert len({Path(s.video).stem for s in ss}) == 1334
    assert all(0 <= a < b for s in ss for a, b in s.spans)  # SOURCES.md: no reversed or zero-length span
    assert read_charades_sta(CHARADES_TXT)[0].video == "3MSZA.mp4"  # relative without a root


def test_charades_jsonl_is_the_same_queries_with_clipped_ends():
    txt, taro = read_charades_sta(CHARADES_TXT), read_charades_sta(CHARADES_JSONL)
    assert len(taro) == 3720 and ids_unique(taro)
    assert taro[0].id == "test0" and taro[0].duration == 31.0 and taro[0].spans == [[24.3, 30.4]]
    assert all(t.duration is not None for t in taro)
    assert [Path(s.video).name for s in txt] == [Path(s.video).name for s in taro]  # same order, same videos
    # The txt spans are read unclipped: TaRO clipped 551 ends to the duration, nothing else differs.
    clipped = [(a, b) for a, b in zip(txt, taro) if a.spans != b.spans]
    assert len(clipped) == 551
    assert all(b.spans[0][1] == b.duration < a.spans[0][1] and a.spans[0][0] == b.spans[0][0] for a, b in clipped)
    assert sum(a.query != b.query for a, b in zip(txt, taro)) == 7  # the queries TaRO truncated at a comma


def test_rextime_both_forms_agree():
    a, b = read_rextime(REXTIME_JSON, video_root="/v"), read_rextime(REXTIME_JSONL, video_root="/v")
    assert len(a) == len(b) == 921 and ids_unique(a)
    assert [(s.id, s.spans, s.duration, s.video, s.query) for s in a] == \
           [(s.id, s.spans, s.duration, s.video, s.query) for s in b]
    by_id = {s.id: s for s in a}
    assert by_id["anet_val867"].spans == [[1.0, 1.0]]  # zero-length GT spans are kept
    assert by_id["anet_val889"].spans == [[0.0, 0.0]]
    assert by_id["anet_val92"].video == "/v/activitynet/v_ZMTi498qnPc.mp4" and by_id["anet_val92"].duration == 100.5
    assert by_id["qvh_val241"].video == "/v/qvhighlights/2I9-kvemtSU_510.0_660.0.mp4"
    assert by_id["qvh_val241"].spans == [[0.0, 28.0]] and by_id["qvh_val241"].duration == 150.0
    assert sum("/activitynet/" in s.video for s in a) == 741 and sum("/qvhighlights/" in s.video for s in a) == 180
    assert {s.source for s in a} == {"rextime"}


def test_nextgqa():
    ss = read_nextgqa(NEXTGQA_CSV, video_root="/nextqa")
    assert len(ss) == 5553 and ids_unique(ss)
    n_spans = [len(s.spans) for s in ss]
    assert sum(n > 1 for n in n_spans) == 591 and max(n_spans) == 16
    by_id = {s.id: s for s in ss}
    multi = by_id["6885309190_6"]
    assert multi.query == "how did the baby rest his head a few times in the video"
    assert multi.spans == [[6.0, 7.3], [14.0, 15.7]] and multi.duration == 18.0
    first = ss[0]
    assert first.id == "2574374895_8" and first.spans == [[23.0, 27.7]] and first.duration == 30.0
    assert first.video == "/nextqa/1101/2574374895.mp4"  # via map_vid_vidorID.json
    assert all(s.duration is not None for s in ss) and {s.source for s in ss} == {"nextgqa"}
    assert min(a for s in ss for a, _ in s.spans) == -0.2  # kept as read, like the official scorer


def test_read_benchmark_dispatches():
    assert len(read_benchmark("rextime", REXTIME_JSONL)) == 921
    with pytest.raises(ValueError, match="unknown benchmark format"):
        read_benchmark("charades", CHARADES_TXT)
    with pytest.raises(ValueError, match="charades_sta only"):
        read_benchmark("rextime", REXTIME_JSONL, durations={"x": 1.0})


# -----------------------------------------------------------------------------
# Durations: JSON file, then the video file


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    """One real mp4 of 10 frames at SYNTH_FPS = 4: 2.5 s."""
    root = tmp_path_factory.mktemp("videos")
    data.synth_video(str(root / "VIDA.mp4"), 10, [], seed=0)
    return root


def test_charades_duration_fallbacks(tmp_path, tiny_video):
    txt = tmp_path / "sta.txt"
    txt.write_text("VIDA 0.5 1.5##a query\nVIDB 1.0 2.0##another query\nVIDC 0 1##third\n")
    (tmp_path / "durations.json").write_text(json.dumps({"VIDB": 30.5}))
    ss = read_charades_sta(txt, video_root=tiny_video, durations=tmp_path / "durations.json")
    assert [s.id for s in ss] == ["charades_0", "charades_1", "charades_2"]
    assert ss[0].duration == pytest.approx(2.5)  # from the video file: frames / fps
    assert ss[0].video == str(tiny_video / "VIDA.mp4")
    assert ss[1].duration == 30.5  # from the durations file
    assert ss[2].duration is None  # neither
    # The durations file wins over the video file; without a root no video is looked at.
    assert read_charades_sta(txt, video_root=tiny_video, durations={"VIDA": 7})[0].duration == 7.0
    assert read_charades_sta(txt)[0].duration is None


def test_tvg_r1_fixture_round_trip(tmp_path, tiny_video):
    records = [
        {"problem": "the man opens the door", "video": "VIDA.mp4", "video_length": 2.5, "gt_frame": [0.5, 1.25],
         "dataset": "didemo", "choices": ""},
        {"id": "x7", "problem": "a dog runs", "video": "sub/clip.mp4", "video_length": 40, "gt_frame": [3, 9.5],
         "dataset": "tacos"},
        {"problem": "someone sits down", "video": "VIDA.mp4", "gt_frame": [1, 2], "dataset": "charades_train"},
    ]
    src = tmp_path / "tvg.json"
    src.write_text(json.dumps(records, indent=2))
    ss = read_tvg_r1(src, video_root=tiny_video)
    assert [s.id for s in ss] == ["didemo_0", "x7", "charades_train_2"]
    assert [s.source for s in ss] == ["didemo", "tacos", "charades_train"]
    assert ss[0].spans == [[0.5, 1.25]] and ss[0].query == "the man opens the door" and ss[0].duration == 2.5
    assert ss[1].video == str(tiny_video / "sub" / "clip.mp4") and ss[1].duration == 40.0
    assert ss[2].duration == pytest.approx(2.5)  # no video_length: measured from the video
    data.write_jsonl(tmp_path / "out.jsonl", ss)
    assert read_jsonl(tmp_path / "out.jsonl") == ss  # absolute video paths survive as they are


# -----------------------------------------------------------------------------
# Malformed input: DataError naming the file, the line (or record) and what is wrong

NEXTGQA_HEADER = "video_id,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n"
NEXTGQA_ROW = "111,10,320,240,what did the man do,wave,{qid},TN,a,b,c,d,e\n"


def _nextgqa_dir(tmp_path, rows):
    (tmp_path / "test.csv").write_text(NEXTGQA_HEADER + "".join(rows))
    (tmp_path / "gsub_test.json").write_text(json.dumps(
        {"111": {"duration": 20, "location": {"0": [[1, 2]], "1": [[3, 4], [5, 6]]}, "fps": 30}}))
    (tmp_path / "map_vid_vidorID.json").write_text(json.dumps({"111": "0001/111"}))
    return tmp_path / "test.csv"


BAD = [  # (format, file name, content, the expected message after "NAME:")
    ("charades_sta", "bad.txt", "AAAAA 1.0 2.0##ok\nAAAAA 1.0 2.0 person sits\n",
     "2: expected 'VID START END##sentence'"),
    ("charades_sta", "bad.txt", "AAAAA 1.0##short\n", "1: expected 'VID START END##sentence'"),
    ("charades_sta", "bad.txt", "AAAAA 1.0 2.0##ok\nAAAAA 1.0 2.0##\n", "2: expected 'VID START END##sentence'"),
    ("charades_sta", "bad.txt", "AAAAA one 2.0##text\n", "1: START and END must be seconds"),
    ("charades_sta", "bad.txt", "AAAAA 5.0 2.0##text\n", "1: span [5.0, 2.0] starts after it ends"),
    ("charades_sta", "bad.jsonl", '{"qid": "a", "query": "q", "vid": "V", "relevant_windows": [[1, 2]]}\n\n{"qid": \n',
     "3: not valid JSON"),
    ("charades_sta", "bad.jsonl", '{"qid": "a", "query": "q", "vid": "V"}\n', "1: missing key 'relevant_windows'"),
    ("charades_sta", "bad.jsonl", '{"qid": "a", "query": "q", "vid": "V", "relevant_windows": [[1, 2]]}\n'
     '{"qid": "a", "query": "r", "vid": "V", "relevant_windows": [[1, 2]]}\n', "2: duplicate sample id 'a'"),
    ("charades_sta", "bad.jsonl", '{"qid": "a", "query": "", "vid": "V", "relevant_windows": [[1, 2]]}\n',
     "1: the query must be non-empty text"),
    ("charades_sta", "bad.txt", "\n\n", " no samples in the file"),
    ("rextime", "bad.json", json.dumps([{"qid": "a", "vid": "v_12345678901", "duration": 9, "question": "q",
                                         "span": [1, 2]}, {"qid": "b", "vid": "x", "duration": 9, "question": "q"}]),
     " record 1: missing key 'span'"),
    ("rextime", "bad.jsonl", '{"qid": "a", "vid": "x", "duration": -3, "query": "q", "relevant_windows": [[0, 1]]}\n',
     "1: duration must be positive"),
    ("rextime", "bad.jsonl", '{"qid": "a", "vid": "x", "duration": 9, "query": "q", "relevant_windows": [[0, 1, 2]]}\n',
     "1: a span must be [start, end]"),
    ("tvg_r1", "bad.json", json.dumps([{"problem": "q", "video": "a.mp4", "video_length": 9, "gt_frame": ["a", 2]}]),
     " record 0: span times must be numbers"),
    ("tvg_r1", "bad.json", '[{"problem": "q",\n "video": }]', "2: not valid JSON"),
    ("tvg_r1", "bad.json", json.dumps([["q", "a.mp4"]]), " record 0: expected a JSON object"),
]


@pytest.mark.parametrize("fmt,name,content,message", BAD)
def test_malformed_input_names_file_and_line(tmp_path, fmt, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        read_benchmark(fmt, path)
    assert f"{path}:{message}" in str(e.value)


@pytest.mark.parametrize("row,message", [
    (NEXTGQA_ROW.format(qid=7), ":3: question 7 of video 111 has no span in gsub_test.json"),
    ("111,10,320,240,what,wave,1\n", ":3: expected 13 comma-separated fields"),
    ("222" + NEXTGQA_ROW.format(qid=0)[3:], ":3: video 222 has no entry with a 'location' in gsub_test.json"),
])
def test_nextgqa_malformed(tmp_path, row, message):
    csv_path = _nextgqa_dir(tmp_path, [NEXTGQA_ROW.format(qid=1), row])
    with pytest.raises(DataError) as e:
        read_nextgqa(csv_path)
    assert f"{csv_path}{message}" in str(e.value)


def test_nextgqa_small_file_and_missing_companion(tmp_path):
    csv_path = _nextgqa_dir(tmp_path, [NEXTGQA_ROW.format(qid=0), NEXTGQA_ROW.format(qid=1)])
    ss = read_nextgqa(csv_path)
    assert [(s.id, s.spans, s.duration, s.video) for s in ss] == [
        ("111_0", [[1.0, 2.0]], 20.0, "0001/111.mp4"), ("111_1", [[3.0, 4.0], [5.0, 6.0]], 20.0, "0001/111.mp4")]
    (tmp_path / "map_vid_vidorID.json").unlink()
    with pytest.raises(DataError, match="needs map_vid_vidorID.json beside it"):
        read_nextgqa(csv_path)


def test_bad_durations_file(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"AAAAA": "long"}))
    (tmp_path / "s.txt").write_text("AAAAA 1 2##q\n")
    with pytest.raises(DataError, match=r"d\.json: the duration of 'AAAAA' must be a number"):
        read_charades_sta(tmp_path / "s.txt", durations=tmp_path / "d.json")


# -----------------------------------------------------------------------------
# The CLI, run as a user runs it


def run_cli(*args, check=True):
    r = subprocess.run([sys.executable, "data.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_convert_cli(tmp_path):
    out = tmp_path / "charades.jsonl"
    r = run_cli("convert", "--format", "charades_sta", "--input", CHARADES_TXT, "--out", out)
    assert "wrote 3720 samples" in r.stdout and "0 with a known duration" in r.stdout
    back = read_jsonl(out)
    assert len(back) == 3720 and back[0].query == "person turn a light on."
    assert back[0].video == str(tmp_path / "3MSZA.mp4")  # relative paths resolve against the JSONL's dir

    out = tmp_path / "nextgqa.jsonl"
    r = run_cli("convert", "--format", "nextgqa", "--input", NEXTGQA_CSV, "--video-root", tmp_path / "nowhere",
                "--out", out)
    assert "5553 with a known duration, 0 with an existing video file" in r.stdout and "check --video-root" in r.stdout
    assert [s.spans for s in read_jsonl(out)] == [s.spans for s in read_nextgqa(NEXTGQA_CSV)]


def test_convert_cli_counts_existing_videos(tmp_path, tiny_video):
    (tmp_path / "sta.txt").write_text("VIDA 0.5 1.5##a query\nVIDX 1 2##missing video\n")
    r = run_cli("convert", "--format", "charades_sta", "--input", tmp_path / "sta.txt", "--video-root", tiny_video,
                "--out", tmp_path / "o.jsonl")
    assert "wrote 2 samples" in r.stdout and "1 with a known duration, 1 with an existing video file" in r.stdout
    assert [s.duration for s in read_jsonl(tmp_path / "o.jsonl")] == [pytest.approx(2.5), None]


def test_convert_cli_errors(tmp_path):
    (tmp_path / "bad.txt").write_text("AAAAA 1 2##ok\nnot a line\n")
    r = run_cli("convert", "--format", "charades_sta", "--input", tmp_path / "bad.txt", "--out", tmp_path / "o.jsonl",
                check=False)
    assert r.returncode == 1 and f"{tmp_path / 'bad.txt'}:2: expected" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.jsonl").exists()
    r = run_cli("convert", "--format", "rextime", "--input", REXTIME_JSONL, "--durations", "d.json",
                "--out", tmp_path / "o.jsonl", check=False)
    assert r.returncode == 2 and "--durations applies to --format charades_sta only" in r.stderr


def test_synth_cli(tmp_path):
    run_cli("synth", "--out", tmp_path, "--train", 1, "--test", 1, "--seed", 3, "--events", 2)
    train, test = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "test.jsonl")
    assert len(train) == len(test) == 2  # 1 video x 2 events each
    assert Path(train[0].video).is_file() and train[0].video != test[0].video
