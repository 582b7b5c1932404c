import json

import pytest

from mmpeft.instruct.backends import Reply, Sampling
from mmpeft.instruct.run import Job, ServerUnreachable, generate
from mmpeft.instruct.store import ResultStore

PARAGRAPH = "Two dogs run across a green field while a person stands near the fence and watches."
URL = "http://127.0.0.1:8000/v1/chat/completions"
REPLIES = {"up": Reply(PARAGRAPH), "down": Reply(error="URLError: [Errno 111] Connection refused", unreachable=True),
           "refused": Reply(error="HTTP 400: prompt too long")}


class _Scripted:
    """A backend whose every `run` (one chunk of requests) answers as the next word of its
    script says: "up", "down" (no answer) or "refused"; "up" once the script is used."""

    name, kind, url, sampling = "m", "scripted", URL, Sampling()

    def __init__(self, script=()):
        self.script, self.asked = list(script), []

    def run(self, requests):
        state = self.script.pop(0) if self.script else "up"
        self.asked.append(len(requests))
        for i in range(len(requests)):
            yield i, REPLIES[state]


def _jobs(n):
    return [Job(f"key{k}", "detail", f"r{k}", f"{k}.jpg", [{"role": "user", "content": "x"}], "v") for k in range(n)]


def _generate(jobs, backend, store, **kw):
    return generate(jobs, backend, store, 0, 3, set(), lambda job, pairs: {"id": job.record_id}, progress=False,
                    chunk=2, retry_wait=(0.01, 0.02), **kw)


def _accepted_ids(store):
    return [json.loads(line)["record"]["id"] for line in store.accepted_path.read_text().splitlines()]


def test_an_outage_costs_no_attempt_and_is_reported_once(tmp_path, capsys):
    store = ResultStore(tmp_path)
    stats = _generate(_jobs(5), _Scripted(["up", "down", "down", "down", "up"]), store)
    assert _accepted_ids(store) == ["r0", "r1", "r2", "r3", "r4"] and sum(stats.accepted.values()) == 5
    assert {row["provenance"]["attempt"] for row in store.accepted.values()} == {1}
    assert not store.rejected_path.exists() and not stats.rejected
    out = capsys.readouterr().out
    assert out.count(f"the server at {URL} is not answering (URLError: [Errno 111] Connection refused)") == 1
    assert out.count("answers again after") == 1


def test_an_outage_past_the_limit_stops_and_a_rerun_finishes(tmp_path):
    store = ResultStore(tmp_path)
    backend = _Scripted(["up"] + ["down"] * 1000)
    with pytest.raises(ServerUnreachable, match=rf"the server at {URL} has been unreachable for \d+ s \(last error: "
                                                r"URLError.*\); 2 of 5 records are done and stored in "):
        _generate(_jobs(5), backend, store, max_outage=0.3)
    assert len(backend.asked) > 3  # it kept trying until the limit
    store = ResultStore(tmp_path)
    stats = _generate(_jobs(5), _Scripted(), store)
    assert stats.already_done == 2 and sum(stats.accepted.values()) == 3
    assert _accepted_ids(store) == ["r0", "r1", "r2", "r3", "r4"]


def test_refused_requests_are_left_for_a_rerun_and_old_transport_failures_retried(tmp_path):
    store = ResultStore(tmp_path)
    stats = _generate(_jobs(1), _Scripted(["refused"] * 3), store)
    assert stats.left_for_rerun == 1 and stats.rejected == {"backend error": 3} and not stats.given_up
    rows = [json.loads(line) for line in store.rejected_path.read_text().splitlines()]
    assert [(r["reason"], r["detail"], r["final"]) for r in rows] == [("backend error", "HTTP 400: prompt too long",
                                                                     False)] * 3
    # as an earlier version wrote them: connection failures as the final rejection of a record
    with open(store.rejected_path, "a") as f:
        for attempt in (1, 2, 3):
            f.write(json.dumps({"key": "key1", "reason": "backend error", "detail": "URLError: [Errno 111] "
                                "Connection refused", "reply": "", "final": attempt == 3}) + "\n")
        for attempt in (1, 2, 3):
            f.write(json.dumps({"key": "key2", "reason": "malformed", "detail": "", "reply": "Q",
                                "final": attempt == 3}) + "\n")
    store = ResultStore(tmp_path)
    assert [store.done(f"key{k}") for k in range(3)] == [False, False, True]
    assert store.attempts("key0") == store.attempts("key1") == 0 and store.attempts("key2") == 3
    backend = _Scripted()
    stats = _generate(_jobs(3), backend, store)
    assert backend.asked == [2] and sum(stats.accepted.values()) == 2 and stats.already_done == 1
    assert {row["provenance"]["attempt"] for row in store.accepted.values()} == {1}
