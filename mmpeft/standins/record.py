"""What every stand-in builder shares: the choice between real and cut sizes, and the
`standin.json` record of every value that differs from the real repository."""

from __future__ import annotations

import json
from pathlib import Path

RECORD = "standin.json"


def sizes(real: dict, cut: dict, full_size: bool) -> dict:
    """The real depth and width when `full_size`, else the cut ones."""
    return real if full_size else cut


def diff(real: dict, cut: dict) -> dict:
    """`{key: {"real": ..., "standin": ...}}` for each key whose cut value is not the real one."""
    return {k: {"real": real[k], "standin": cut[k]} for k in real if real[k] != cut[k]}


def record(folder: Path, source: str, cut: dict, full_size: bool, seed: int, notes: list[str]) -> None:
    """`folder/standin.json`: the Hub id stood in for, the seed of the random weights, the
    cut sizes (none at full size) and notes on everything else that differs from the real
    repository."""
    (Path(folder) / RECORD).write_text(json.dumps(
        {"stands_in_for": source, "full_size": full_size, "seed": seed, "weights": "random",
         "cut": {} if full_size else cut, "notes": notes}, indent=1) + "\n")


def edit_json(path: Path, **values) -> None:
    """Set `values` in the JSON file at `path`, dropping the keys this transformers writes
    that the Hub's files do not have."""
    data = json.loads(path.read_text())
    for key in ("backend", "is_local", "local_files_only"):
        data.pop(key, None)
    path.write_text(json.dumps({**data, **values}, indent=2, sort_keys=True) + "\n")
