"""`data_gen/make_llava_instruct.py` run as users run it, against OpenAI-compatible servers
on loopback: one in this process that answers in the prompts' formats (to kill, restart and
resume against), and llama.cpp's server with the SmolLM2 GGUF (a real model)."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mmpeft.data.readers import read_llava_json

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "data_gen" / "make_llava_instruct.py"
REPLIES = {
    "You write chat data": "Q: What shapes are in the picture?\nA: Simple coloured shapes.\n"
                           "Q: Is the background dark?\nA: Yes, it is dark.",
    "You write picture descriptions": "A few simple coloured shapes sit on a dark, plain background, spread "
                                      "across the picture with space between them.",
    "You edit picture descriptions": "A red bus is parked at the side of a street, and two people stand near "
                                     "its open door.",
    "You write reasoning questions": "Q: Could the shapes be stacked on each other?\nA: No, each shape sits in "
                                     "its own part of the picture with empty space around it.",
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay: float, throttle_first: bool, port: int = 0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.delay, self.throttle, self.seen, self.lock = delay, throttle_first, [], threading.Lock()
        self.dead = False


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            throttle, self.server.throttle = self.server.throttle, False
            self.server.seen.append({"auth": self.headers.get("Authorization"), "seed": body["seed"],
                                     "last": body["messages"][-1]["content"]})
        if throttle:  # the first request is told to come back later
            self.send_response(429)
            self.send_header("Retry-After", "0.3")
            self.end_headers()
            return
        time.sleep(self.server.delay)
        if self.server.dead:  # a dying server answers nothing; the connection just closes
            return
        system = body["messages"][0]["content"]
        text = next(reply for prefix, reply in REPLIES.items() if system.startswith(prefix))
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 100, "completion_tokens": 20}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:  # the client was killed mid-request
            pass


def _start(srv: _Server) -> _Server:
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _kill(srv: _Server) -> None:
    """Stop as a server process dies: requests in flight get no answer, the port closes."""
    srv.dead = True
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server():
    srv = _start(_Server(delay=0.05, throttle_first=True))
    yield srv
    _kill(srv)


@pytest.fixture
def servers():
    """Starts servers that take `delay` s a reply, on a given port to restart one; stops them all."""
    started = []

    def start(port: int = 0, delay: float = 0.1) -> _Server:
        started.append(_start(_Server(delay, throttle_first=False, port=port)))
        return started[-1]

    yield start
    for srv in started:
        _kill(srv)


def _command(world, out, base_url, *extra):
    ann = world / "coco" / "annotations"
    return [sys.executable, str(SCRIPT), "--captions", str(ann / "captions_train.json"), "--instances",
            str(ann / "instances_train.json"), "--image-prefix", "train/", "--base-url", base_url, "--model", "m",
            "--output", str(out), "--no-progress", "--concurrency", "2", *extra]


def test_killed_run_resumes_with_every_record_once(small_world, server, tmp_path):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    out = tmp_path / "killed" / "data.json"
    env = {**os.environ, "MY_KEY": "sk-secret-123"}
    cmd = _command(small_world, out, url, "--api-key-env", "MY_KEY")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    accepted = out.with_name("data.json.work") / "accepted.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and (not accepted.exists() or accepted.read_text().count("\n") < 20):
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    first_log = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done_before = accepted.read_text().count("\n")
    requests_before = len(server.seen)
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"({done_before} already done)" in again.stdout
    records = json.loads(out.read_text())
    n_images = len(json.loads((small_world / "coco/annotations/captions_train.json").read_text())["images"])
    assert len(records) == 3 * n_images and len({r["id"] for r in records}) == len(records)
    keys = [json.loads(line)["key"] for line in accepted.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len(records)
    # the rerun asked only for what was missing (a request in flight at the kill may be asked again)
    assert len(server.seen) - requests_before <= len(records) - done_before + 2
    sent_keys = {s["auth"] for s in server.seen}
    # the same data as an uninterrupted run
    clean = tmp_path / "clean" / "data.json"
    assert subprocess.run(_command(small_world, clean, url), cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    assert json.loads(clean.read_text()) == records
    # LLaVA's loader reads it; the image marker and question come first, placed both ways
    samples = read_llava_json(out, small_world / "coco")
    assert all(s.images[0].exists() for s in samples)
    firsts = [r["conversations"][0]["value"] for r in records]
    assert any(f.startswith("<image>\n") for f in firsts) and any(f.endswith("\n<image>") for f in firsts)
    # the key went only into the Authorization header, and nowhere on disk or in the logs
    assert sent_keys == {"Bearer sk-secret-123"}
    written = "".join(p.read_text() for p in out.parent.rglob("*") if p.is_file())
    assert "sk-secret" not in written + first_log + again.stdout + again.stderr
    provenance = [json.loads(line) for line in out.with_name("data.json.provenance.jsonl").read_text().splitlines()]
    assert [p["id"] for p in provenance] == [r["id"] for r in records]
    assert {p["backend"] for p in provenance} == {"openai"} and {p["model"] for p in provenance} == {"m"}


def _wait_for_records(accepted: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while not accepted.exists() or accepted.read_text().count("\n") < n:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.02)


def _one_each(out: Path, n: int) -> list[dict]:
    """The output's records, checked to be `n` with distinct ids, each stored once."""
    records = json.loads(out.read_text())
    assert len(records) == n and len({r["id"] for r in records}) == n
    keys = [json.loads(line)["key"] for line in (out.parent / f"{out.name}.work" / "accepted.jsonl").open()]
    assert len(keys) == len(set(keys)) == n
    return records


def test_a_server_restart_mid_run_loses_no_record(small_world, servers, tmp_path):
    first = servers()
    port = first.server_address[1]
    out = tmp_path / "data.json"
    # no retries in the backend: every failed request reaches the run's own backoff
    cmd = _command(small_world, out, f"http://127.0.0.1:{port}/v1", "--limit", "20", "--max-retries", "0")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_records(out.with_name("data.json.work") / "accepted.jsonl", 15, proc)
        _kill(first)
        time.sleep(3)
        second = servers(port)
        log = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-3000:]
    records = _one_each(out, 60)
    assert second.seen and not (out.parent / "data.json.work" / "rejected.jsonl").exists()
    provenance = [json.loads(line) for line in out.with_name("data.json.provenance.jsonl").open()]
    assert {p["attempt"] for p in provenance} == {1}  # the outage used up no record's attempts
    # said when it began and when it ended, not once per failed request (twice only if a reply
    # sent just before the kill arrives after the first failure)
    began, ended = log.count(f"the server at http://127.0.0.1:{port}/v1/chat/completions is not answering"), \
        log.count("answers again after")
    assert began == ended and began in (1, 2), log[-3000:]
    clean = tmp_path / "clean" / "data.json"
    assert subprocess.run(_command(small_world, clean, f"http://127.0.0.1:{port}/v1", "--limit", "20"), cwd=ROOT,
                          capture_output=True, timeout=300).returncode == 0
    assert json.loads(clean.read_text()) == records


def test_an_outage_past_the_limit_stops_the_run_and_a_rerun_finishes(small_world, servers, tmp_path):
    first = servers(delay=0.2)  # slow enough that the run is still going when the server dies
    port = first.server_address[1]
    out = tmp_path / "data.json"
    accepted = out.with_name("data.json.work") / "accepted.jsonl"
    cmd = _command(small_world, out, f"http://127.0.0.1:{port}/v1", "--limit", "10", "--max-retries", "0",
                   "--max-outage", "3")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_records(accepted, 8, proc)
        _kill(first)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = accepted.read_text().count("\n")
    assert proc.returncode == 1 and "Traceback" not in err and not out.exists(), err[-3000:]
    stopped = re.search(rf"stopped: the server at http://127.0.0.1:{port}/v1/chat/completions has been unreachable "
                        rf"for (\d+) s \(last error: .*\); {done} of 30 records are done and stored in .*; the same "
                        "command continues where this run stopped", err)
    assert stopped and int(stopped.group(1)) >= 3, err[-3000:]
    servers(port)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"({done} already done)" in again.stdout
    _one_each(out, 30)


def test_dry_run_prints_prompts_and_sends_nothing(small_world, server, tmp_path):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    proc = subprocess.run(_command(small_world, tmp_path / "d.json", url, "--dry-run", "--limit", "2"), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("===== ") == 6 and "dry run: 6 requests" in proc.stdout
    assert server.seen == [] and not (tmp_path / "d.json").exists()


def test_refine_rewrites_descriptions_and_keeps_other_records(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    long = "A red bus are parked at the side of a street. The bus is red. There is a red bus. Two people stand near"
    records = [{"id": "d", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                                               {"from": "gpt", "value": long}]},
               {"id": "q", "image": "b.jpg", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                               {"from": "gpt", "value": "Red."}]}]
    (tmp_path / "in.json").write_text(json.dumps(records))
    proc = subprocess.run([sys.executable, str(ROOT / "data_gen" / "refine_descriptions.py"), "--input",
                           str(tmp_path / "in.json"), "--base-url", url, "--model", "m", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads((tmp_path / "in.refined.json").read_text())
    assert [r["id"] for r in out] == ["d", "q"]
    assert out[0]["conversations"][1]["value"] == REPLIES["You edit picture descriptions"]
    assert out[0]["conversations"][0] == records[0]["conversations"][0] and out[1] == records[1]
    assert "1 descriptions to refine, 1 other records kept as they are" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _log_shown_on_failure(log: Path):
    """Print the end of a server's log when the block fails, so the reason can be read."""
    try:
        yield
    except BaseException:
        text = log.read_text(errors="replace") if log.exists() else "(nothing was written)"
        print(f"----- the end of {log}\n{text[-8000:]}")
        raise


def test_llama_cpp_server_with_the_smollm2_gguf(small_world, tmp_path):
    pytest.importorskip("llama_cpp.server", reason="the dev extra installs llama-cpp-python[server]")
    from mmpeft.instruct.backends import default_gguf

    port = _free_port()
    log = tmp_path / "llama_cpp_server.log"
    with open(log, "w") as sink, _log_shown_on_failure(log):
        server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf()),
                                   "--host", "127.0.0.1", "--port", str(port), "--model_alias", "smollm2",
                                   "--n_ctx", "4096"], stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                assert time.time() < deadline and server.poll() is None, "llama.cpp server did not start"
                time.sleep(0.5)
            out = tmp_path / "llama.json"
            proc = subprocess.run(_command(small_world, out, f"http://127.0.0.1:{port}/v1", "--limit", "2",
                                           "--model", "smollm2", "--max-new-tokens", "200", "--max-attempts", "2",
                                           "--max-outage", "60"),
                                  cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, (f"llama.cpp server exit status: {server.poll()}\n"
                                          + proc.stdout[-2000:] + proc.stderr[-2000:])
        finally:
            server.terminate()
            server.wait(30)
        # every job ended as a record or as rejected replies with reasons; tokens really came back
        work = tmp_path / "llama.json.work"
        accepted = [json.loads(x) for x in (work / "accepted.jsonl").read_text().splitlines()] if (
            work / "accepted.jsonl").exists() else []
        rejected = [json.loads(x) for x in (work / "rejected.jsonl").read_text().splitlines()] if (
            work / "rejected.jsonl").exists() else []
        finished = {a["key"] for a in accepted} | {r["key"] for r in rejected if r["final"]}
        assert len(finished) == 6
        assert all(r["reason"] and r["reply"] is not None for r in rejected)
        assert all(a["provenance"]["completion_tokens"] > 0 for a in accepted)
        assert "tokens generated" in proc.stdout and not proc.stdout.count("backend error")
        assert len(json.loads(out.read_text())) == len(accepted)
