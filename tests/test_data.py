"""The Sample record, the synthetic benchmark's videos, and the time encoding of model inputs."""
import json

import numpy as np
import pytest
import torch

import data
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES


# --- the record ------------------------------------------------------------------------------------

def test_jsonl_round_trip(tmp_path):
    s = data.Sample(id="a", video="v.mp4", duration=12.5, query="q", spans=[[1.0, 2.5], [4.0, 5.0]],
                    source="x", captions=[{"start": 1.0, "end": 2.5, "text": "c"}], cot="because", answer=[1.0, 2.5])
    data.write_jsonl(tmp_path / "s.jsonl", [s])
    (back,) = data.read_jsonl(tmp_path / "s.jsonl")
    assert back.video == str((tmp_path / "v.mp4").resolve())  # relative paths resolve against the file
    back.video = "v.mp4"
    assert back == s
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "video": "v", "duration": 5, "query": "q"', "not valid JSON"),
    ('{"id": "a", "video": "v", "duration": 5, "query": "q"}', "missing field(s) spans"),
    ('{"id": "a", "video": "v", "duration": -1, "query": "q", "spans": [[0, 1]]}', "duration must be positive"),
    ('{"id": "a", "video": "v", "duration": 5, "query": "q", "spans": [[0, "x"]]}', "span times must be numbers"),
    ('{"id": "a", "video": "v", "duration": 5, "query": "q", "spans": [[0, 1, 2]]}', "must be [start, end]"),
    ('{"id": "a", "video": "v", "duration": 5, "query": "q", "spans": []}', "non-empty list"),
    ('{"id": "a", "video": "v", "duration": 5, "query": "q", "spans": [[0, NaN]]}', "finite"),
    ('{"id": "a", "video": "v", "duration": 5, "query": "q", "spans": [[0, 1]], "oops": 1}', "unknown field(s) oops"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = '{"id": "ok", "video": "v", "duration": 5, "query": "q", "spans": [0, 1]}'
    p = tmp_path / "bad.jsonl"
    p.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(data.DataError) as e:
        data.read_jsonl(p)
    assert f"{p}:3:" in str(e.value) and message in str(e.value)


def test_missing_and_corrupt_videos_name_the_sample(tmp_path):
    s = data.Sample(id="s1", video=str(tmp_path / "nope.mp4"), duration=5, query="q", spans=[[0, 1]])
    with pytest.raises(data.DataError, match="sample s1: video not found"):
        data.load_video(s)
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    s.video = str(tmp_path / "bad.mp4")
    with pytest.raises(data.DataError, match="sample s1: cannot decode video"):
        data.load_video(s)


def test_prompt_is_the_papers():
    msgs = data.build_messages(data.Sample("a", "v.mp4", 5.0, "the red circle", [[0, 1]]))
    assert msgs[0]["content"][0]["text"].startswith("You MUST reason based on the temporal changes")
    assert "enclosed within <time> </time> tags." in msgs[0]["content"][0]["text"]
    # the video comes before the query, with the paper's frame budget
    assert [c["type"] for c in msgs[1]["content"]] == ["video", "text"]
    assert msgs[1]["content"][0]["nframes"] == 64 and msgs[1]["content"][0]["max_pixels"] == 128 * 28 * 28


# --- the synthetic benchmark -------------------------------------------------------------------------

def test_synth_is_deterministic_and_varied(synth_dir, tmp_path):
    train = data.read_jsonl(synth_dir / "train.jsonl")
    test = data.read_jsonl(synth_dir / "test.jsonl")
    assert len(train) == 12 and len(test) == 6
    assert not {s.video for s in train} & {s.video for s in test}  # disjoint videos
    for s in train + test:
        (a, b), = s.spans
        assert 0 <= a < b <= s.duration and 8 <= s.duration <= 40
        assert len(s.captions) == 3
    data.synth(str(tmp_path), n_train=4, n_test=2, seed=0)
    again = (tmp_path / "train.jsonl").read_text().replace(str(tmp_path), "")
    assert again == (synth_dir / "train.jsonl").read_text().replace(str(synth_dir), "")


def test_synth_event_visible_exactly_inside_its_span(synth_dir):
    import decord
    s = data.read_jsonl(synth_dir / "train.jsonl")[0]
    vr = decord.VideoReader(s.video)
    frames = vr.get_batch(list(range(len(vr)))).asnumpy().astype(int)  # (T, H, W, 3)
    assert len(vr) == round(s.duration * data.SYNTH_FPS)
    for cap in s.captions:
        color = next(c for c in data.SYNTH_COLORS if f" {c} " in cap["text"])
        rgb = np.array(data.SYNTH_COLORS[color])
        # pixels within a small distance of the event's colour (h264 shifts colours a little)
        hits = (np.abs(frames - rgb).max(-1) < 40).sum((1, 2))
        t = np.arange(len(vr)) / data.SYNTH_FPS
        inside = (t >= cap["start"]) & (t < cap["end"])
        assert hits[inside].min() > 20, f"{color} not visible in its span"
        assert hits[~inside].max() < 5, f"{color} visible outside its span"


# --- time encoding: positions follow real seconds -----------------------------------------------------

def test_position_ids_follow_real_time(tiny_model_dir, synth_dir):
    import model
    processor = model.load_processor(tiny_model_dir)
    m = model.load_model(tiny_model_dir)
    samples = data.read_jsonl(synth_dir / "train.jsonl")
    by_video = {}
    for s in samples:
        by_video.setdefault(s.video, s)
    a, b = sorted(by_video.values(), key=lambda s: s.duration)[:: len(by_video) - 1][:2]
    assert a.duration != b.duration
    steps = []
    for s in (a, b):
        frames, meta = data.load_video(s, NFRAMES, MAX_PIXELS, MIN_PIXELS)
        assert frames.shape[0] == NFRAMES
        inp = data.build_inputs(processor, [s], [(frames, meta)], nframes=NFRAMES, max_pixels=MAX_PIXELS,
                                min_pixels=MIN_PIXELS)
        # qwen-vl-utils spreads NFRAMES over the whole clip: sampled fps = NFRAMES / duration, and one
        # temporal patch (2 frames) spans 2 / sampled fps seconds. Without the metadata it would be 2 / 24.
        sampled_fps = NFRAMES / meta["total_num_frames"] * meta["fps"]
        assert sampled_fps == pytest.approx(NFRAMES / s.duration)
        assert inp["second_per_grid_ts"].item() == pytest.approx(2 / sampled_fps, rel=1e-4)
        pos, _ = m.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"],
                                        video_grid_thw=inp["video_grid_thw"],
                                        second_per_grid_ts=inp["second_per_grid_ts"],
                                        attention_mask=inp["attention_mask"])
        video = inp["input_ids"][0] == processor.video_token_id
        t_ids = pos[0, 0, video].unique()  # temporal position of each temporal patch
        assert len(t_ids) == NFRAMES // 2
        step = (t_ids[1:] - t_ids[:-1]).float().mean().item()
        # tokens_per_second (2) * seconds per temporal patch
        assert step == pytest.approx(2 * inp["second_per_grid_ts"].item(), abs=1.0)
        steps.append(step)
        # Qwen2.5-VL's own layout (model.get_rope_index): the text after the video resumes after the
        # video's last position, not inside its time range as transformers >= 5.3 would place it.
        after = int(video.nonzero().max()) + 1
        assert pos[:, 0, after].tolist() == [int(pos[:, 0, video].max()) + 1] * 3
    assert steps[1] > steps[0] * 1.5  # the longer clip's frames are further apart in time, as they should be


def test_text_inputs_equal_the_processors_without_the_pixels(tiny_model_dir, synth_dir):
    """build_text_inputs (sft.py's batches from kept vision outputs) against build_inputs: every tensor
    but the pixels equal, for SFT batches (answers, right padding) and generation prompts (left),
    with videos of different lengths in one batch."""
    import model
    processor = model.load_processor(tiny_model_dir)
    vkw = dict(nframes=NFRAMES, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    samples = data.read_jsonl(synth_dir / "train.jsonl")[::2]  # 6 samples, all 4 videos
    videos = [data.load_video(s, **vkw) for s in samples]
    assert len({round(s.duration, 2) for s in samples}) > 1
    for answers, side in (([f"<think>{s.query}</think> <time>[1.00, 2.00]</time>" for s in samples], "right"),
                          (None, "left")):
        a = data.build_inputs(processor, samples, videos, answers=answers, padding_side=side, **vkw)
        b = data.build_text_inputs(processor, samples, a["video_grid_thw"].tolist(), a["second_per_grid_ts"].tolist(),
                                   answers=answers, padding_side=side, **vkw)
        assert set(a.keys()) - set(b.keys()) == {"pixel_values_videos"}
        for k in b:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert (a["attention_mask"] == 0).any()  # the padding side was exercised


def test_cached_video_is_the_decoded_one_and_decoded_once(synth_dir, monkeypatch):
    """load_video_cached (sft.py and grpo.py --cache-videos): the kept uint8 copy gives back exactly the
    decoded frames, and the second call does not decode."""
    s = data.read_jsonl(synth_dir / "train.jsonl")[0]
    vkw = dict(nframes=NFRAMES, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    fresh, meta = data.load_video(s, **vkw)
    cache = {}
    first, _ = data.load_video_cached(s, cache, **vkw)
    assert cache[s.video][0].dtype == torch.uint8 and torch.equal(first, fresh)
    monkeypatch.setattr(data, "load_video", lambda *a, **k: pytest.fail("decoded again"))
    again, meta_again = data.load_video_cached(s, cache, **vkw)
    assert again.dtype == fresh.dtype and torch.equal(again, fresh) and meta_again == meta
