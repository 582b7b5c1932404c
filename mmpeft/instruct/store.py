"""Results kept as they arrive, so a killed run loses nothing and a rerun repeats nothing.

Two append-only JSONL files in the output folder: `accepted.jsonl` (one line per finished
record, with its provenance) and `rejected.jsonl` (one line per rejected reply, with the
reason). Every line carries the job's key: a hash of image, task, prompt version, model and
seed. Lines are flushed and synced as written; a line cut short by a kill is removed when
the store is opened again.

Only judged replies (a reply that came back and was checked) use up a record's attempts or
finish it. Rows with the reason `SERVER_ERROR` hold no reply from the model: the server
refused the request, or, in stores written before transport failures were kept out of
this file, could not be reached. They stay in the file for the report, and a record they
ended is asked again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

SERVER_ERROR = "backend error"

def job_key(image: str, task: str, prompt_version: str, model: str, seed: int) -> str:
    return hashlib.sha256(json.dumps([image, task, prompt_version, model, seed]).encode()).hexdigest()[:20]


def _read_lines(path: Path) -> list[dict]:
    """Whole JSON lines of `path`; a torn last line is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for n, line in enumerate(data[:end].splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {n} is not JSON ({err}); the file was changed by hand?") from err
    return rows


class ResultStore:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.accepted_path, self.rejected_path = self.folder / "accepted.jsonl", self.folder / "rejected.jsonl"
        self.accepted = {row["key"]: row for row in _read_lines(self.accepted_path)}
        self.rejections: Counter = Counter()
        self.given_up: set[str] = set()
        for row in _read_lines(self.rejected_path):
            self._count(row["key"], row["reason"], row.get("final", False))

    def _count(self, key: str, reason: str, final: bool) -> None:
        if reason == SERVER_ERROR:
            return
        self.rejections[key] += 1
        if final:
            self.given_up.add(key)

    def done(self, key: str) -> bool:
        """Accepted, or given up after its last judged reply."""
        return key in self.accepted or key in self.given_up

    def attempts(self, key: str) -> int:
        """Judged replies rejected so far."""
        return self.rejections[key]

    def _append(self, path: Path, row: dict) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def accept(self, key: str, record: dict, provenance: dict) -> None:
        if key in self.accepted:
            return
        row = {"key": key, "record": record, "provenance": provenance}
        self._append(self.accepted_path, row)
        self.accepted[key] = row

    def reject(self, key: str, reason: str, detail: str, reply: str, final: bool, meta: dict) -> None:
        self._append(self.rejected_path, {"key": key, "reason": reason, "detail": detail, "reply": reply,
                                          "final": final, **meta})
        self._count(key, reason, final)
