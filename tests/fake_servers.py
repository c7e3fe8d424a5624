"""A local stand-in for the teachers' HTTP APIs, started by the tests: the only stand-in we allow.

One `ThreadingHTTPServer` on 127.0.0.1 (port 0) speaks both formats the real SDKs use:
- OpenAI chat completions: `POST .../chat/completions`;
- Gemini `generateContent`: `POST /v1beta/models/{model}:generateContent` (the SDK version picks
  the `v1`/`v1beta` prefix, so any prefix is accepted), plus the Files API (resumable upload, get,
  delete) for large videos.

A request is identified by its query: the last text part of the user turn, which is what
annotate.py sends after the video. Per query the server counts requests and replies from a script:
the scripted steps first (an HTTP error status, a slow reply, a reply held until released, or one of
the ways a real server misbehaves: MALFORMED JSON, an EMPTY answer, an ERROR_BODY sent with status 200,
a connection CUT mid-answer), then the default answer text.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Misbehaviours a script can hold (besides an HTTP status, ("sleep", s), ("hold", Event), ("echo_key", status)):
MALFORMED = "malformed"  # 200 with a body that is not JSON (a proxy's cut-off or garbled reply)
EMPTY = "empty"  # 200 with a well-formed reply whose answer text is empty
ERROR_BODY = "error_body"  # 200 whose body is an error object, not a reply (some gateways do this)
CUT = "cut"  # the headers announce the whole reply, half of it is sent, then the connection closes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 refuses connections when many requests (and retries) come at once


class FakeTeacher:
    def __init__(self):
        self.counts: Counter = Counter()  # query -> requests received (every attempt counts)
        self.answers: dict[str, str] = {}  # query -> reply text once its script is used up
        self.script: dict[str, list] = {}  # query -> steps: 429/500, ("sleep", s), ("hold", Event), ("echo_key", 400),
        #                                   MALFORMED, EMPTY, ERROR_BODY, CUT
        self.bodies: dict[str, list[dict]] = {}  # query -> request JSON bodies
        self.times: dict[str, list[float]] = {}  # query -> when each request came (time.monotonic())
        self.headers: list[dict] = []  # every request's headers
        self.files: dict[str, bytes] = {}  # Files API: name -> uploaded bytes
        self.in_flight = self.max_in_flight = 0  # concurrent generate requests, now and at most
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _handler(self))
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

    def next_step(self, query: str):
        with self.lock:
            self.counts[query] += 1
            self.times.setdefault(query, []).append(time.monotonic())
            steps = self.script.get(query)
            return steps.pop(0) if steps else None


def _query_openai(body: dict) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return [p["text"] for p in content if p.get("type") == "text"][-1]


def _query_gemini(body: dict) -> str:
    return [p["text"] for p in body["contents"][-1]["parts"] if "text" in p][-1]


def _openai_reply(text: str, model: str) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 50, "total_tokens": 1050}}


def _gemini_reply(text: str) -> dict:
    return {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 2000, "candidatesTokenCount": 60, "totalTokenCount": 2060},
            "modelVersion": "gemini-fake"}


def _handler(fake: FakeTeacher):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def _send(self, status: int, payload: dict | None = None, headers: dict | None = None, raw: bytes | None = None,
                  cut: bool = False):
            if raw is None:
                raw = json.dumps(payload).encode() if payload is not None else b""
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw[:len(raw) // 2] if cut else raw)
                if cut:  # the rest never comes: the client reads a short body, then EOF
                    self.wfile.flush()
                    self.close_connection = True
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def _error(self, status: int, message: str = ""):
            names = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 400: "INVALID_ARGUMENT"}
            self._send(status, {"error": {"code": status, "message": message or f"fake error {status}",
                                          "status": names.get(status, "UNKNOWN")}})

        def do_GET(self):  # Files API: get -> the file is ACTIVE at once
            fake.headers.append(dict(self.headers))
            name = "files/" + self.path.rsplit("/", 1)[-1]
            if name not in fake.files:
                return self._error(404)
            self._send(200, self._file(name, "ACTIVE"))

        def do_DELETE(self):
            fake.files.pop("files/" + self.path.rsplit("/", 1)[-1], None)
            self._send(200, {})

        def _file(self, name: str, state: str) -> dict:
            return {"name": name, "mimeType": "video/mp4", "state": state,
                    "uri": f"{fake.url}/v1beta/{name}", "sizeBytes": str(len(fake.files[name]))}

        def do_POST(self):
            fake.headers.append(dict(self.headers))
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/upload/"):  # resumable upload, step 1: hand out a session URL
                with fake.lock:
                    name = f"files/f{len(fake.files)}"
                    fake.files[name] = b""
                return self._send(200, None, {"X-Goog-Upload-URL": f"{fake.url}/upload-session/{name}"})
            if self.path.startswith("/upload-session/"):  # step 2: the bytes, then "finalize"
                name = self.path[len("/upload-session/"):]
                fake.files[name] = raw
                return self._send(200, {"file": self._file(name, "PROCESSING")}, {"X-Goog-Upload-Status": "final"})
            body = json.loads(raw)
            if self.path.endswith("/chat/completions"):
                query, kind = _query_openai(body), "openai"
            elif self.path.endswith(":generateContent"):
                query, kind = _query_gemini(body), "gemini"
            else:
                return self._error(404)
            with fake.lock:
                fake.bodies.setdefault(query, []).append(body)
            with fake.lock:
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            try:
                step = fake.next_step(query)
                if isinstance(step, int):
                    return self._error(step)
                if isinstance(step, tuple) and step[0] == "echo_key":
                    key = self.headers.get("x-goog-api-key") or self.headers.get("Authorization", "")
                    return self._error(step[1], f"API key not valid: {key.removeprefix('Bearer ')}")
                if isinstance(step, tuple) and step[0] == "sleep":
                    time.sleep(step[1])
                if isinstance(step, tuple) and step[0] == "hold":
                    step[1].wait(60)
                if step == MALFORMED:
                    return self._send(200, raw=b'{"choices": [{"index": 0, "message": {"role": "assist')
                if step == ERROR_BODY:
                    return self._send(200, {"error": {"message": "upstream overloaded, try again", "code": 503}})
                time.sleep(0.05)  # a little latency, so concurrent requests really overlap
                text = "" if step == EMPTY else fake.answers.get(query, "no idea")
                reply = _openai_reply(text, body.get("model", "")) if kind == "openai" else _gemini_reply(text)
                self._send(200, reply, cut=step == CUT)
            finally:
                with fake.lock:
                    fake.in_flight -= 1

    return Handler
