"""demo.py as a user meets it: the app started on a free local port with a model that answers
(conftest's `answering_model_dir`), asked through its API with gradio_client, answers with the span
predict.py gives for the same video and query; bad input comes back as a clear error. And gradio stays
out of the training path."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import data
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES, ROOT

FLAGS = ["--nframes", str(NFRAMES), "--max-pixels", str(MAX_PIXELS), "--min-pixels", str(MIN_PIXELS),
         "--max-new-tokens", "40"]
ENV = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_demo(args: list[str], log: Path):
    """`python demo.py ARGS` on a free 127.0.0.1 port, its output in `log`: yields the URL once the
    page answers, and stops the app on the way out. (tests/screenshot_demo.py uses it too.)"""
    port = free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), *args, "--port", str(port)], cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT, env=ENV)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"demo.py did not come up on {url}:\n{log.read_text()}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def app(answering_model_dir, tmp_path_factory):
    with running_demo(["--model", answering_model_dir, *FLAGS], tmp_path_factory.mktemp("demo") / "demo.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client
    return Client(app, verbose=False)


def test_api_answer_equals_predict_py(client, answering_model_dir, synth_dir):
    from gradio_client import handle_file
    s = data.read_jsonl(synth_dir / "test.jsonl")[1]
    reasoning, span, png = client.predict(handle_file(s.video), s.query, api_name="/answer")
    p = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--model", answering_model_dir, "--video", s.video,
                        "--query", s.query, *FLAGS, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (want,) = json.loads(p.stdout)["answers"][0]
    assert (reasoning, span) == (want["reasoning"], want["span"])
    assert span == s.spans[0]  # a real span (the model learned this query), not None == None
    with Image.open(png) as im:  # the timeline: one row, 9 x 1.9 inches at 80 dpi
        assert im.size == (720, 152)


def test_bad_input_is_a_clear_error(client, synth_dir):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    s = data.read_jsonl(synth_dir / "test.jsonl")[0]
    with pytest.raises(AppError, match="Type a query"):
        client.predict(handle_file(s.video), "   ", api_name="/answer")
    with pytest.raises(AppError, match="Upload a video first"):
        client.predict(None, s.query, api_name="/answer")


def test_the_stages_do_not_import_gradio():
    code = ("import sys, data, model, reward, annotate, sft, grpo, eval, predict; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'gradio_client')))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
