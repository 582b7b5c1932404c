"""data_gen's OpenAI-compatible HTTP backend: N requests in flight against one at a time,
same server, same prompts, same token budget, measured side by side.

    python benchmarks/data_gen_http.py                 # starts llama-cpp-python's server on the SmolLM2 GGUF
    python benchmarks/data_gen_http.py --base-url http://127.0.0.1:8080/v1 --model qwen --prompts 64

Both sides go through `OpenAIBackend`, the class data_gen uses, with greedy decoding and a
fixed `max_tokens`; `min_tokens` (a llama.cpp option, sent through the backend's
`extra_body`) holds the end of sequence back, so every reply has the same length
(`--no-min-tokens` for servers that reject it). Throughput is completion tokens per second
from the `usage` the server returns; how many replies stopped early is printed. Runs
alternate (concurrent, sequential, ...) after a warm-up request, and the median of
`--repeats` is reported with the spread.

Why concurrency buys nothing on llama-cpp-python's own server (read in 0.3.36):
`llama_cpp/server/app.py` hands every request its model through `get_llama_proxy()`, which
holds the module-level `llama_inner_lock` (an anyio Lock) for the whole request, around the
one `Llama` instance that `LlamaProxy` (`llama_cpp/server/model.py`) keeps loaded; uvicorn
runs a single process (`llama_cpp/server/__main__.py`). `ModelSettings` in
`llama_cpp/server/settings.py` has no parallel-slots option (no `n_parallel`, `n_seq_max`);
`Llama.__init__` (`llama_cpp/llama.py`) raises `n_seq_max` only for embeddings.
`interrupt_requests` only cuts streamed replies short. So there is no option to expose here:
to measure parallel decoding, point `--base-url` at a server that batches requests
(llama.cpp's own `llama-server --parallel N`, vLLM).
"""

import argparse
import contextlib
import inspect
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from itertools import pairwise
from pathlib import Path

from mmpeft.instruct.backends import OpenAIBackend, Request, Sampling, default_gguf
from mmpeft.instruct.prompts import load_prompt

TARGET = 3.0


@contextlib.contextmanager
def llama_cpp_server(gguf: Path, threads: int, timeout: float):
    """llama-cpp-python's server on a free loopback port; yields its base URL once it answers
    `GET /v1/models`, and stops it on the way out whatever happened."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                                   "127.0.0.1", "--port", str(port), "--model_alias", "smollm2", "--n_ctx", "4096",
                                   "--n_threads", str(threads), "--n_threads_batch", str(threads)],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not _answers(base):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = "".join(log.readlines()[-20:])
                    why = f"exited with {server.returncode}" if server.poll() is not None else (
                        f"did not answer GET {base}/models within {timeout:.0f} s")
                    raise RuntimeError(f"llama.cpp server on {gguf} {why}; its last output:\n{tail}")
                time.sleep(0.5)
            yield base
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/models", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def measure(backend: OpenAIBackend, requests: list[Request]) -> dict:
    """One pass over `requests`: completion tokens per second from the returned `usage`, the
    gaps between replies arriving, and how many replies stopped before `max_tokens`."""
    start = time.perf_counter()
    arrivals, tokens, early, errors = [], 0, 0, []
    for i, reply in backend.run(requests):
        arrivals.append(time.perf_counter() - start)
        if reply.error:
            errors.append(f"request {i}: {reply.error}")
        tokens += reply.completion_tokens
        early += reply.finish_reason != "length"
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(requests)} requests to {backend.url} failed:\n" + "\n".join(errors))
    if tokens == 0:
        raise RuntimeError(f"{backend.url} returned no completion_tokens in usage; tokens/s cannot be measured")
    seconds = arrivals[-1]
    gaps = [b - a for a, b in pairwise([0.0, *arrivals])]
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "stopped_early": early,
            "median_gap_s": statistics.median(gaps)}


def llama_cpp_serialises() -> str | None:
    """Why the installed llama-cpp-python server runs one request at a time, read from its
    source (see the module docstring), or None when that source no longer shows it."""
    import llama_cpp
    from llama_cpp.server import app, settings

    locked = "llama_inner_lock" in inspect.getsource(app.get_llama_proxy)
    slots = [f for f in settings.ModelSettings.model_fields if "parallel" in f or "seq" in f]
    if not locked or slots:
        return None
    return (f"llama-cpp-python {llama_cpp.__version__} decodes one request at a time: get_llama_proxy() in "
            f"{inspect.getsourcefile(app)} holds llama_inner_lock around its single Llama for each whole request, "
            f"and {inspect.getsourcefile(settings)} has no parallel-slots setting to lift it. Concurrent requests "
            "only queue there; a server that batches them (llama-server --parallel N, vLLM) can be measured "
            "with --base-url.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="an already running server (default: start llama-cpp-python's)")
    p.add_argument("--model", default="smollm2", help="the model name sent in each request")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="the started server's --n_threads")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--no-min-tokens", action="store_true",
                   help="do not send min_tokens (for servers that reject it); replies may then stop early")
    p.add_argument("--output", default="outputs/benchmarks/data_gen_http.json")
    args = p.parse_args(argv)
    problems = [f"--{k.replace('_', '-')} must be at least {low}, got {getattr(args, k)}"
                for k, low in (("prompts", 1), ("concurrency", 2), ("new_tokens", 1), ("repeats", 1), ("threads", 1))
                if getattr(args, k) < low]
    if problems:
        p.error("; ".join(problems))

    prompt = load_prompt("conversation")
    requests = [Request(prompt.messages(f"A picture of {n} coloured shapes on a dark background."), 0)
                for n in range(args.prompts)]
    sampling = Sampling(args.new_tokens, 0.0, 1.0)
    with contextlib.ExitStack() as stack:
        base = args.base_url or stack.enter_context(
            llama_cpp_server(default_gguf(), args.threads, args.startup_timeout))
        # no retries: a retried request would be timed as if it were one
        # min_tokens (llama.cpp) holds back the end of sequence, so both sides generate the same tokens
        extra = {} if args.no_min_tokens else {"min_tokens": args.new_tokens}
        backends = {name: OpenAIBackend(base, args.model, sampling, args.api_key_env, n, timeout=600.0, max_retries=0,
                                        extra_body=extra)
                    for name, n in ((f"{args.concurrency} in flight", args.concurrency), ("one at a time", 1))}
        measure(backends["one at a time"], requests[:1])  # warm-up: loads pages, fills the prompt cache
        passes = {name: [] for name in backends}
        for _ in range(args.repeats):
            for name, b in backends.items():
                passes[name].append(measure(b, requests))

    runs = {name: [x["tokens_per_s"] for x in v] for name, v in passes.items()}
    med = {name: statistics.median(v) for name, v in runs.items()}
    fast, slow = backends
    ratio = med[fast] / med[slow]
    for name, v in passes.items():
        print(f"{name:>14}: {med[name]:8.1f} tokens/s (runs {', '.join(f'{x:.1f}' for x in runs[name])}); "
              f"{v[0]['tokens']} tokens a run, {sum(x['stopped_early'] for x in v)} of {len(v) * args.prompts} "
              "replies stopped before max_tokens")
    print(f"{fast} / {slow}: {ratio:.2f}x (target {TARGET}x: {'met' if ratio >= TARGET else 'MISSED'}); "
          f"{args.prompts} prompts, max_tokens {args.new_tokens}, greedy, "
          f"{args.threads} server threads, {base if args.base_url else 'llama-cpp-python server, SmolLM2 GGUF'}")
    explanation = None
    if ratio < TARGET:
        gap = statistics.median(x["median_gap_s"] for x in passes[fast])
        alone = statistics.median(x["seconds"] / args.prompts for x in passes[slow])
        explanation = (f"With {args.concurrency} in flight, replies came back one every {gap:.2f} s (median gap); "
                       f"one request alone takes {alone:.2f} s. ")
        explanation += ("Equal spacing means the server decoded them one after another." if gap > 0.5 * alone
                        else "Replies arrived in bursts, so the server did overlap some of the work.")
        if not args.base_url:
            explanation += "\n" + (llama_cpp_serialises() or "The installed llama_cpp.server no longer shows the "
                                   "single request lock this benchmark's docstring describes; read it again.")
        print(explanation)
    result = {"runs": runs, "median": med, "ratio": ratio, "target": TARGET, "met": ratio >= TARGET,
              "passes": passes, "explanation": explanation, "settings": vars(args)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
