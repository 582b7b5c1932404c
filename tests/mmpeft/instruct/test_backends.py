import email.utils
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmpeft.instruct.backends import OpenAIBackend, Request, Sampling, _retry_after


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        status, headers = self.server.script.pop(0) if self.server.script else (200, {})
        self.server.times.append(time.time())
        if status != 200:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(b'{"error": "no"}')
            return
        data = json.dumps({"choices": [{"message": {"content": "Q: Hi?\nA: Yes."}, "finish_reason": "length"}],
                           "usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.script, srv.times, srv.bodies = [], [], []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


def _backend(server, **kw):
    return OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}/v1/", "m", Sampling(), backoff=0.01, **kw)


def test_retry_after_is_honoured(server):
    server.script = [(429, {"Retry-After": "0.4"}), (503, {})]
    reply = _backend(server).complete(Request([{"role": "user", "content": "x"}], 1))
    assert reply.error is None and reply.text == "Q: Hi?\nA: Yes." and reply.finish_reason == "length"
    assert (reply.prompt_tokens, reply.completion_tokens) == (7, 3)
    assert server.times[1] - server.times[0] >= 0.4 and len(server.times) == 3


def test_failures_end_as_errors_not_gaps(server):
    server.script = [(500, {})] * 10
    reply = _backend(server, max_retries=2).complete(Request([], 1))
    assert reply.error.startswith("HTTP 500") and len(server.times) == 3
    server.script, server.times = [(400, {})], []
    assert _backend(server).complete(Request([], 1)).error.startswith("HTTP 400") and len(server.times) == 1
    dead = OpenAIBackend("http://127.0.0.1:9/v1", "m", Sampling(), max_retries=1, backoff=0.01, timeout=2)
    assert "URLError" in dead.complete(Request([], 1)).error


def test_no_answer_is_told_apart_from_a_refusal(server):
    dead = OpenAIBackend("http://127.0.0.1:9/v1", "m", Sampling(), max_retries=0, timeout=2)
    assert dead.complete(Request([], 1)).unreachable
    for status, unreachable in ((503, True), (429, True), (504, True), (500, False), (400, False), (404, False)):
        server.script = [(status, {})]
        reply = _backend(server, max_retries=0).complete(Request([], 1))
        assert reply.error.startswith(f"HTTP {status}") and reply.unreachable is unreachable, status
    assert not _backend(server).complete(Request([], 1)).unreachable


def test_a_run_stops_sending_once_the_server_is_unreachable(server):
    server.script = [(503, {})] * 10
    backend = _backend(server, concurrency=1, max_retries=0)
    got = dict(backend.run([Request([{"role": "user", "content": str(i)}], i) for i in range(6)]))
    assert sorted(got) == list(range(6)) and len(server.times) == 1
    assert all(r.unreachable and r.error.startswith("HTTP 503") for r in got.values())


def test_run_returns_every_request(server):
    backend = _backend(server, concurrency=3)
    got = dict(backend.run([Request([{"role": "user", "content": str(i)}], i) for i in range(7)]))
    assert sorted(got) == list(range(7))


def test_extra_body_goes_with_every_request_but_sets_none_of_the_backends_fields(server):
    backend = _backend(server, extra_body={"min_tokens": 5, "max_tokens": 1, "model": "other"})
    backend.complete(Request([{"role": "user", "content": "x"}], 1))
    body = server.bodies[0]
    assert body["min_tokens"] == 5 and body["max_tokens"] == Sampling().max_new_tokens and body["model"] == "m"


def test_retry_after_forms():
    assert _retry_after("2.5") == 2.5 and _retry_after(None) is None and _retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < _retry_after(later) <= 30
    assert "sk-" not in repr(OpenAIBackend("http://h/v1", "m", Sampling()))
