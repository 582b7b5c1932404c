"""benchmarks/data_scale.py: its synthetic data has LLaVA-665K's shape, and the whole script
runs its three starts at small counts."""

import importlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def scale(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("data_scale")


def test_records_have_an_image_and_three_rounds_of_about_350_words(scale, tmp_path):
    path = tmp_path / "r.json"
    scale.write_records(path, 50)
    records = json.loads(path.read_text())
    assert len(records) == 50 and len({r["id"] for r in records}) == 50
    assert {r["image"] for r in records} == {f"{k}.jpg" for k in range(16)}
    for r in records:
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3
        assert turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
        assert 300 <= sum(len(t["value"].split()) for t in turns) <= 400
    scale.write_shards(tmp_path / "shards", 25, per_shard=10)
    with tarfile.open(tmp_path / "shards" / "00002.tar") as tar:
        assert sorted(tar.getnames()) == [f"{k:08d}.{e}" for k in range(20, 25) for e in ("jpg", "txt")]


def test_the_script_measures_three_starts_at_two_counts_and_the_shards(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "benchmarks/data_scale.py", "--records", "60,150", "--pairs", "40",
                           "--threads", "1", "--work", str(tmp_path / "work"), "--output", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for count, row in [*result["results"]["llava_json"].items(), ("40", result["results"]["caption_shards"])]:
        assert set(row) == {"memory", "first start", "later start"}
        assert {side["records"] for side in row.values()} == {int(count)}
        assert all(side["peak_bytes"] >= 0 and side["seconds"] > 0 and side["batch_tokens"] > 0
                   for side in row.values())
    assert len(list((tmp_path / "work" / "prepared").iterdir())) == 3  # one prepared set per data
    assert result["speed_ratio"] == pytest.approx(result["results"]["llava_json"]["150"]["memory"]["seconds"]
                                                  / result["results"]["llava_json"]["150"]["later start"]["seconds"])
    assert "later start" in proc.stdout and "at 150 records" in proc.stdout
