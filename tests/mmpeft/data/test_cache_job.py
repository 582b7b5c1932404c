"""A cache build as a job: split over ranks, resumable after a kill, sized before it starts,
and waiting for the other ranks as long as they make progress."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mmpeft.data import cache_job
from mmpeft.data.cache_job import Progress, placed, wait_for_shards
from mmpeft.data.diffusion_targets import FrozenOutputs, _weights_key
from mmpeft.data.feature_cache import TensorCache

HERE = Path(__file__).parent
ITEMS = list(range(40))
ROW_BYTES = 16 * 4  # a float32 row of the linear layer's 16 outputs


class LinearTargets(FrozenOutputs):
    """A frozen linear layer's output for integer items: shards of about 6 rows, batches of 4."""

    what, batch_size, shard_bytes = "rows", 4, 6 * ROW_BYTES

    def __init__(self, cache_root, dtype=None, model_dtype=torch.float32):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(8, 16).to(model_dtype)
        key = "linear-" + _weights_key(self.model, dtype=dtype)
        super().__init__(TensorCache(cache_root, key) if cache_root else None, dtype)

    def key(self, item: int) -> str:
        return f"item-{item:03d}"

    @torch.no_grad()
    def encode(self, items: list[int]) -> torch.Tensor:
        x = torch.stack([torch.linspace(-1, 1, 8) * (i + 1) for i in items])
        return self.model(x.to(self.model.weight.device, self.model.weight.dtype))


def build(cache_root, kill_after_batches: int | None = None, log=lambda *_: None) -> int:
    """Build the linear cache of ITEMS; with `kill_after_batches` the process dies (no
    cleanup, as a killed job) when encode is called once more after that many batches."""
    targets = LinearTargets(cache_root)
    if kill_after_batches is not None:
        calls, encode = [], targets.encode

        def dying(items):
            calls.append(len(items))
            if len(calls) > kill_after_batches + 1:  # the first call sizes a row
                os._exit(3)
            return encode(items)

        targets.encode = dying
    return targets.prepare(ITEMS, log=log, log_seconds=0)


def _folder(cache_root) -> Path:
    return LinearTargets(cache_root).cache.folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _shard_keys(folder: Path) -> list[str]:
    return [k for p in sorted(folder.glob("shard-*.keys.json")) for k in json.loads(p.read_text())]


_KILLED = """
import sys
sys.path.insert(0, sys.argv[1])
from test_cache_job import build
build(sys.argv[2], int(sys.argv[3]))
"""


def test_a_build_killed_half_way_and_rerun_equals_an_uninterrupted_one_byte_for_byte(tmp_path):
    lines = []
    assert build(tmp_path / "whole", log=lines.append) == 40
    whole = _folder(tmp_path / "whole")
    shards = sorted(whole.glob("shard-*.safetensors"))
    assert len(shards) > 3  # several shards, so a kill can fall between them
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(HERE), str(tmp_path / "killed"), "10"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    killed = _folder(tmp_path / "killed")
    finished = _shard_keys(killed)
    # killed inside a shard, with fewer than half the rows left: a plan sized by what is left would differ
    assert 20 < len(finished) < 40 and not (killed / "index.json").exists()
    assert build(tmp_path / "killed") == 40 - len(finished)  # the rerun encodes only what is missing
    assert sorted(_shard_keys(killed)) == [f"item-{i:03d}" for i in ITEMS]  # every item exactly once
    assert _files(killed) == _files(whole)  # shards, shard lists, index and cache.json, and nothing else
    info = json.loads((whole / "cache.json").read_text())
    assert info == {"items": 40, "shards": len(shards), "bytes": sum(p.stat().st_size for p in shards),
                    "dtype": "float32", "shape": [16]}
    estimate = rf"40 rows to encode in {len(shards)} shards over 1 rank\(s\), 7\.5 KiB \(64 B each, float32 \(16,\)"
    assert any(re.search(estimate, line) for line in lines)  # rows x (row bytes + 128 for its key)


_RANK = """
import json, os, re, sys, torch
rank, folder, tests, port = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
sys.path.insert(0, tests)
from test_cache_job import ITEMS, LinearTargets
from mmpeft.data.diffusion_targets import prepare_targets
targets = LinearTargets(folder + "/two")
lines = []
prepare_targets(targets, ITEMS, log=lines.append, log_seconds=0)
encoded = int(re.search(r"(\\d+) encoded now on this rank", lines[-1]).group(1))
json.dump({"encoded": encoded, "lines": lines, "values": targets(ITEMS).tolist(),
           "index": len(targets.cache.index)}, open(f"{folder}/rank{rank}.json", "w"))
torch.distributed.destroy_process_group()
"""


def test_two_ranks_each_encode_a_slice_and_write_what_one_rank_writes(two_ranks, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    results = two_ranks(_RANK, lambda r: [str(HERE), port])
    assert build(tmp_path / "one") == 40
    one, two = _folder(tmp_path / "one"), _folder(tmp_path / "two")
    assert all(r["encoded"] > 0 for r in results) and sum(r["encoded"] for r in results) == 40
    assert sorted(_shard_keys(two)) == [f"item-{i:03d}" for i in ITEMS]  # every item once, over both ranks
    assert _files(two) == _files(one)
    reference = LinearTargets(tmp_path / "one")(ITEMS)
    for r in results:
        assert r["index"] == 40 and torch.equal(torch.tensor(r["values"]), reference)
        progress = [line for line in r["lines"] if line.startswith(f"cache rank {results.index(r)} of 2:")]
        assert progress[-1].startswith(f"cache rank {results.index(r)} of 2: {r['encoded']}/{r['encoded']} rows")
        assert re.search(r"\d+\.\d rows/s, ETA 0s$", progress[-1])


def test_a_cache_that_will_not_fit_stops_before_writing_naming_folder_and_sizes(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache_job.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    needed = 40 * (ROW_BYTES + 128)  # the rows and their keys' share of the index
    with pytest.raises(OSError, match=rf"{re.escape(str(_folder(tmp_path)))}: 40 rows of float32 \(16,\) "
                                      rf"need .*\({needed} bytes\).*\(1000 bytes\) is free"):
        build(tmp_path)
    assert list(_folder(tmp_path).iterdir()) == []


def test_a_bf16_build_stores_bf16_under_its_own_key_and_puts_the_model_back(tmp_path):
    fp32, bf16 = LinearTargets(None), LinearTargets(tmp_path, torch.bfloat16)
    weight = fp32.model.weight.detach().clone()
    assert _weights_key(fp32.model) == _weights_key(fp32.model, dtype=torch.float32)
    assert bf16.cache.folder != _folder(tmp_path)  # the dtype is part of the key
    assert bf16.prepare(ITEMS, log=lambda *_: None) == 40
    assert bf16(ITEMS).dtype == torch.bfloat16 and bf16.cache.info()["dtype"] == "bfloat16"
    torch.testing.assert_close(bf16(ITEMS).float(), fp32(ITEMS), rtol=0.02, atol=0.1)
    assert bf16.model.weight.dtype == torch.float32 and torch.equal(bf16.model.weight, weight)
    in_bf16 = LinearTargets(tmp_path / "model", model_dtype=torch.bfloat16)  # no dtype given: the model's
    assert in_bf16.prepare(ITEMS, log=lambda *_: None) == 40 and in_bf16(ITEMS).dtype == torch.bfloat16


def test_placement_moves_and_casts_for_the_build_and_restores_the_very_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    before = dict([*model.named_parameters(), *model.named_buffers()])
    with placed([model, model], "meta", torch.bfloat16):  # a model named twice is moved once
        assert model[0].weight.device.type == "meta" and model[0].weight.dtype == torch.bfloat16
        assert model[1].running_mean.dtype == torch.bfloat16
        assert model[1].num_batches_tracked.dtype == torch.int64  # only floating-point tensors change dtype
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(after[n] is before[n] for n in before)
    assert model[0].weight.device.type == "cpu" and model[0].weight.dtype == torch.float32


def test_progress_logs_done_over_total_the_rate_and_the_time_left():
    now, lines = [0.0], []
    progress = Progress(10, "images", "cache rank 0 of 1", lines.append, every=2.0, clock=lambda: now[0])
    for t, n in ((1.0, 2), (2.0, 2), (5.0, 6)):
        now[0] = t
        progress.advance(n)
    assert lines == ["cache rank 0 of 1: 4/10 images (40.0%), 2.0 images/s, ETA 3s",
                     "cache rank 0 of 1: 10/10 images (100.0%), 2.0 images/s, ETA 0s"]


def test_the_wait_lasts_while_a_rank_makes_progress_and_ends_when_none_does(tmp_path):
    shard = tmp_path / "shard-x.keys.json"

    def other_rank(beats: int):
        for i in range(beats):
            (tmp_path / f"{cache_job.HEARTBEAT}1").write_text(str(i))
            time.sleep(0.1)
        shard.write_text("[]")

    worker = threading.Thread(target=other_rank, args=(15,))  # 1.5 s of batches, longer than the stall limit
    worker.start()
    wait_for_shards(tmp_path, [shard], lambda *_: None, stall_seconds=0.6, poll_seconds=0.05)
    worker.join()
    assert shard.exists()
    with pytest.raises(TimeoutError, match=rf"cache {re.escape(str(tmp_path))}: 1 of 1 shards .*shard-y"):
        wait_for_shards(tmp_path, [tmp_path / "shard-y.keys.json"], lambda *_: None, stall_seconds=0.3,
                        poll_seconds=0.05)


def test_a_rank_whose_partner_never_comes_keeps_its_shards_and_names_the_stall(tmp_path):
    targets = LinearTargets(tmp_path)
    with pytest.raises(TimeoutError, match="no rank has finished a batch for 0 s"):
        targets.prepare(ITEMS, log=lambda *_: None, rank=0, world=2, stall_seconds=0.2)
    mine = _shard_keys(_folder(tmp_path))
    assert 0 < len(mine) < 40  # rank 0's slice is on disk for the rerun
    assert build(tmp_path) == 40 - len(mine)
