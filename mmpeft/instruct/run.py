"""Jobs (one image and one task, or one description to refine), their generation with
retries into a `ResultStore`, and the final LLaVA JSON assembled from the store."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmpeft.instruct.backends import Request
from mmpeft.instruct.checks import Rejected, drop_repeated_questions, read_reply
from mmpeft.instruct.context import ImageContext
from mmpeft.instruct.prompts import TaskPrompt
from mmpeft.instruct.store import SERVER_ERROR, ResultStore, job_key

IMAGE_MARKER = "<image>"


def stable_seed(*parts) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8], 16)


@dataclass
class Job:
    key: str
    task: str
    record_id: str
    image: str | None
    messages: list[dict]
    prompt_version: str
    counts: Counter = field(default_factory=Counter)
    question: str = ""  # the user question of a detail record
    original: dict | None = None  # the record a refine job rewrites


def plan_jobs(contexts: list[ImageContext], prompts: dict[str, TaskPrompt], model: str, seed: int,
              detail_questions: list[str]) -> list[Job]:
    """One job per image and task, in input order."""
    jobs = []
    for ctx in contexts:
        for task, prompt in prompts.items():
            question = ""
            if task == "detail":
                question = random.Random(stable_seed(seed, ctx.image, "question")).choice(detail_questions)
            jobs.append(Job(job_key(ctx.image, task, prompt.version, model, seed), task, f"{ctx.image_id}-{task}",
                            ctx.image, prompt.messages(ctx.render(prompt.uses_boxes)), prompt.version,
                            ctx.counts(), question))
    return jobs


def llava_record(job: Job, pairs: list[tuple[str, str]], seed: int) -> dict:
    """LLaVA's record: `<image>` before or after the first question, by a seeded choice."""
    if job.task == "detail":
        pairs = [(job.question, pairs[0][1])]
    turns = []
    for k, (q, a) in enumerate(pairs):
        if k == 0:
            before = random.Random(stable_seed(seed, job.image, job.task, "marker")).random() < 0.5
            q = f"{IMAGE_MARKER}\n{q}" if before else f"{q}\n{IMAGE_MARKER}"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": job.record_id, "image": job.image, "conversations": turns}


@dataclass
class Stats:
    accepted: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    given_up: Counter = field(default_factory=Counter)
    left_for_rerun: int = 0  # records the server refused `max_attempts` times in this run
    repeated_questions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    already_done: int = 0


class ServerUnreachable(RuntimeError):
    """The server gave no answer for longer than the run was allowed to wait."""


class _Outage:
    """Seconds since the server last answered, and the backoff while it does not. Says once
    when an outage begins and once when it ends, however many requests fail in between."""

    def __init__(self, where: str, limit: float, wait: tuple[float, float], say: Callable[[str], None]):
        self.where, self.limit, (self.first, self.most), self.say = where, limit, wait, say
        self.last_answer, self.began, self.tries, self.error = time.monotonic(), None, 0, ""
        self.jitter = random.Random()

    def answered(self) -> None:
        if self.began is not None:
            self.say(f"{self.where} answers again after {time.monotonic() - self.began:.0f} s")
        self.last_answer, self.began, self.tries = time.monotonic(), None, 0

    def failed(self, error: str) -> None:
        self.error = error
        if self.began is None:
            self.began = time.monotonic()
            self.say(f"{self.where} is not answering ({error}); trying again, with backoff, for up to "
                     f"{self.limit:.0f} s")

    def silent(self) -> float:
        return time.monotonic() - self.last_answer

    def wait(self) -> bool:
        """Sleep before the next try (never past the limit); False once the limit is reached."""
        left = self.limit - self.silent()
        if left <= 0:
            return False
        time.sleep(min(left, self.first * 2 ** self.tries * (0.5 + self.jitter.random()), self.most))
        self.tries += 1
        return True


def generate(jobs: list[Job], backend, store: ResultStore, seed: int, max_attempts: int, known: set[str],
             to_record: Callable[[Job, list], dict], progress: bool = True, chunk: int = 64,
             max_outage: float = 600.0, retry_wait: tuple[float, float] = (1.0, 30.0)) -> Stats:
    """Run every job not finished in `store`; a rejected reply is stored with its reason and
    its job retried with a new seed, up to `max_attempts` judged replies per job.

    A request the server never answered (`Reply.unreachable`) costs its job nothing: the job
    is asked again after a backoff of `retry_wait` (first, longest) seconds, doubling with
    jitter, and once nothing has come back for `max_outage` seconds `ServerUnreachable` is
    raised; what is stored stays, and a rerun continues. A request the server refused (any
    other error) is stored as `SERVER_ERROR` and tried up to `max_attempts` times in this
    run; the store does not count it, so a rerun asks again."""
    from tqdm.auto import tqdm

    def say(message: str) -> None:
        tqdm.write(message)
        sys.stdout.flush()

    stats = Stats(already_done=sum(store.done(j.key) for j in jobs))
    start = time.time()
    queue = deque(j for j in jobs if not store.done(j.key))
    bar = tqdm(total=len(queue), disable=not progress, unit="record", dynamic_ncols=True)
    sampling = asdict(backend.sampling)
    outage = _Outage(f"the server at {getattr(backend, 'url', backend.name)}", max_outage, retry_wait, say)
    refused = Counter()
    try:
        while queue:  # chunks keep progress and storage flowing on long runs
            part = [queue.popleft() for _ in range(min(chunk, len(queue)))]
            seeds = [stable_seed(seed, j.key, store.attempts(j.key)) % 2**31 for j in part]
            requests = [Request(j.messages, s) for j, s in zip(part, seeds, strict=True)]
            unanswered = []
            for i, reply in backend.run(requests):
                job, attempt = part[i], store.attempts(part[i].key) + 1
                if reply.unreachable:
                    outage.failed(reply.error)
                    unanswered.append(i)
                    continue
                outage.answered()
                stats.prompt_tokens += reply.prompt_tokens
                stats.completion_tokens += reply.completion_tokens
                meta = {"task": job.task, "id": job.record_id, "attempt": attempt}
                if reply.error:
                    store.reject(job.key, SERVER_ERROR, reply.error, "", False, meta)
                    stats.rejected[SERVER_ERROR] += 1
                    refused[job.key] += 1
                    if refused[job.key] < max_attempts:
                        queue.append(job)
                    else:
                        stats.left_for_rerun += 1
                        bar.update(1)
                    continue
                try:
                    pairs = read_reply(job.task, reply.text, reply.finish_reason, job.counts, known)
                    pairs, dropped = drop_repeated_questions(pairs)
                    stats.repeated_questions += dropped
                    provenance = {"id": job.record_id, "task": job.task, "model": backend.name,
                                  "backend": backend.kind, "prompt_version": job.prompt_version,
                                  "sampling": sampling, "seed": seeds[i], "attempt": attempt,
                                  "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
                    store.accept(job.key, to_record(job, pairs), provenance)
                    stats.accepted[job.task] += 1
                    bar.update(1)
                except Rejected as err:
                    final = attempt >= max_attempts
                    store.reject(job.key, err.reason, err.detail, reply.text, final, meta)
                    stats.rejected[err.reason] += 1
                    if final:
                        stats.given_up[err.reason] += 1
                        bar.update(1)
                    else:
                        queue.append(job)
                elapsed = max(time.time() - start, 1e-6)
                bar.set_postfix(accepted=sum(stats.accepted.values()), rejected=sum(stats.rejected.values()),
                                tok_s=f"{stats.completion_tokens / elapsed:.1f}", refresh=False)
            queue.extendleft(part[i] for i in sorted(unanswered, reverse=True))  # first again, in order
            if outage.began is not None and not outage.wait():
                done = sum(store.done(j.key) for j in jobs)
                raise ServerUnreachable(
                    f"{outage.where} has been unreachable for {outage.silent():.0f} s (last error: {outage.error}); "
                    f"{done} of {len(jobs)} records are done and stored in {store.folder}")
    finally:
        bar.close()
    stats.seconds = time.time() - start
    return stats


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(jobs: list[Job], store: ResultStore, output: str | os.PathLike) -> tuple[int, int]:
    """The accepted records in job order as one LLaVA JSON file, and their provenance as
    `<output>.provenance.jsonl`. A question that repeats one already asked about the same
    image in another task is dropped (a record left with none is left out); returns the
    number of records written and of questions dropped."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    records, provenance, seen, dropped = [], [], {}, 0
    for job in jobs:
        row = store.accepted.get(job.key)
        if row is None:
            continue
        record = row["record"]
        turns = record["conversations"]
        pairs = [(turns[k]["value"].replace(IMAGE_MARKER, "").strip(), turns[k + 1]["value"])
                 for k in range(0, len(turns), 2)]
        kept, n = drop_repeated_questions(pairs, seen.setdefault(record.get("image"), []))
        if n:
            dropped += n
            if not kept:
                continue
            keep = {q for q, _ in kept}
            record = {**record, "conversations": [t for k in range(0, len(turns), 2) for t in turns[k:k + 2]
                                                  if pairs[k // 2][0] in keep]}
            if IMAGE_MARKER not in record["conversations"][0]["value"] and record.get("image"):
                record["conversations"][0] = {**record["conversations"][0],
                                              "value": f"{IMAGE_MARKER}\n{record['conversations'][0]['value']}"}
        records.append(record)
        provenance.append(row["provenance"])
    write_atomic(output, json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    write_atomic(output.with_name(output.name + ".provenance.jsonl"),
                  "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in provenance))
    return len(records), dropped
