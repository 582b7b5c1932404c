"""Vision features computed once: while the vision tower is frozen, its output for an image
never changes, so stage 1 (and stage 2 with a frozen tower) can read it from disk instead
of running the tower every step of every epoch and every run.

A cache folder belongs to one key: the vision tower's config, weights and the dtype it runs
in, the selected layer, the image processor's settings and the pad-to-square choice.
Inside, images are found by the SHA-1 of their bytes, so two records with the same picture
share one row and a renamed file is still found. Features live in safetensors shards read
lazily, so a cache larger than memory works.

A build is a job over every rank (`TensorCache.add`): each encodes its slice on its own
accelerator, writes shards that survive a kill, and a rerun computes only what is missing.
Folder layout (`root/<key>/`):

- `shard-<h>.safetensors`: one tensor `features`, a row per key; `<h>` hashes its keys.
- `shard-<h>.keys.json`: that shard's keys in row order, written after the shard, so a
  shard without it is unfinished and is encoded again.
- `index.json`: key -> `[shard, row]` over every finished build, and `cache.json`: item
  count, bytes, dtype and row shape; both written by rank 0 once every rank is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmpeft.data.cache_job import (
    HEARTBEAT,
    Progress,
    check_free_space,
    human_bytes,
    model_dtype,
    placed,
    wait_for_shards,
)
from mmpeft.data.conversation import Sample, image_bytes
from mmpeft.train.placement import rank_device

SHARD_BYTES = 1 << 30  # a shard is held in host memory until written: about 1 GiB
ROW_OVERHEAD = 128  # a key's bytes in the shard list and the index, for the disk estimate


def image_digest(image) -> str:
    """SHA-1 of an image's bytes (`image` in any form `image_bytes` reads)."""
    return hashlib.sha1(image_bytes(image)).hexdigest()


def feature_key(vision_tower, image_processor, layer: int, pad_to_square: bool,
                dtype: torch.dtype | None = None) -> str:
    """What the features depend on, hashed: tower config and weights, the dtype the tower
    runs in (None: its parameters'), layer, preprocessing."""
    digest = hashlib.sha256()
    digest.update(vision_tower.config.to_json_string().encode())
    for name, tensor in sorted(vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(image_processor.to_json_string().encode())
    digest.update(json.dumps({"layer": layer, "pad_to_square": pad_to_square,
                              "dtype": str(dtype or model_dtype(vision_tower))}).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def tower_features(vision_tower, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """Hidden states of `layer` with the class token dropped, as LLaVA feeds its connector;
    the pixels go to the tower's device and dtype."""
    weight = next(vision_tower.parameters())
    out = vision_tower(pixel_values.to(weight.device, weight.dtype), output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]


def shard_plan(keys: list[str], new: int, rows_per_shard: int) -> dict[int, list[str]]:
    """Bucket number -> sorted keys of that bucket, for the `keys` to encode. A key's bucket
    is the top bits of its SHA-1, with enough buckets that `new` keys (those of this build,
    finished shards or not) make shards of at most about `rows_per_shard` rows. A finished
    shard is a whole bucket, so after a kill the rest fall in the same buckets as before and
    make the same shards, byte for byte."""
    bits = (max(1, -(-new // rows_per_shard)) - 1).bit_length()
    plan: dict[int, list[str]] = {}
    for key in sorted(keys):
        bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") >> (64 - bits) if bits else 0
        plan.setdefault(bucket, []).append(key)
    return dict(sorted(plan.items()))


def shard_name(keys: list[str]) -> str:
    """The file of the shard holding `keys` (sorted), named by their hash."""
    digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()
    return f"shard-{digest[:16]}.safetensors"


def _keys_file(shard: str) -> str:
    return shard.removesuffix(".safetensors") + ".keys.json"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


class TensorCache:
    """One tensor per key (an image digest, a caption's hash), stored under `root/<key>/`
    in safetensors shards that are read lazily. `add` computes only what is missing."""

    def __init__(self, root: str | os.PathLike, key: str):
        self.folder = Path(root) / key
        self._handles: dict[str, object] = {}
        self.reload()

    def _merged(self) -> dict[str, list]:
        path = self.folder / "index.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def reload(self, merged: dict[str, list] | None = None) -> None:
        """Read the index again (or take `merged`, the index just read), with the shards
        finished since it was written (another process may have added to the cache);
        `unmerged` lists those shards."""
        self.index = self._merged() if merged is None else dict(merged)
        listed = {shard for shard, _ in self.index.values()}
        self.unmerged = []
        for path in sorted(self.folder.glob("shard-*.keys.json")):
            shard = path.name.removesuffix(".keys.json") + ".safetensors"
            if shard not in listed:
                self.unmerged.append(shard)
                for row, key in enumerate(json.loads(path.read_text())):
                    self.index.setdefault(key, [shard, row])

    def info(self) -> dict | None:
        """`cache.json`: items, shards, bytes, dtype and row shape (None before a build ends)."""
        path = self.folder / "cache.json"
        return json.loads(path.read_text()) if path.exists() else None

    def describe(self, what: str = "items") -> str:
        """One line on the cache's size, as the build logs it."""
        info = self.info()
        if not info:
            return f"{len(self.index)} {what} in {self.folder}"
        return (f"{info['items']} {what} in {self.folder}: {human_bytes(info['bytes'])} of {info['dtype']} rows "
                f"{tuple(info['shape'])} in {info['shards']} shards")

    def add(self, todo: list[tuple[str, object]], encode, batch_size: int = 64, what: str = "items",
            log=print, *, models=(), device: torch.device | str | None = None, dtype: torch.dtype | None = None,
            shard_bytes: int = SHARD_BYTES, log_seconds: float = 60.0, stall_seconds: float = 1800.0,
            rank: int | None = None, world: int | None = None) -> int:
        """Store `encode(items)` (a tensor with one row per item) for each `(key, item)` of
        `todo` whose key is not cached yet; returns how many this rank encoded. Every rank
        of the process group calls it with the same `todo`.

        `models` (the frozen models `encode` runs) are moved to `device` (None: the rank's
        accelerator, `rank_device`) in `dtype` (None: as they are) for the build and put
        back afterwards. One encoded item gives the row size: the build logs the bytes it
        will write and stops before the first shard when they do not fit on the disk. The
        missing keys fall into buckets (`shard_plan`) of about `shard_bytes` each; rank `r`
        of `world` (None: the process group's) encodes the buckets whose number is `r`
        modulo `world`, logging its progress every `log_seconds`.

        The ranks share the cache root on one file system. A rank that finishes its slice
        waits for the others' shards on that file system rather than at a collective with
        the process group's timeout: the wait lasts while any rank finishes batches, and
        `stall_seconds` without one is an error. Then one barrier (every rank has finished,
        so it returns at once), and rank 0 merges the shards into `index.json`."""
        import torch.distributed as dist

        if rank is None or world is None:
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        todo = dict(todo)
        merged = self._merged()  # only a finished build changes it: every rank and every rerun plans alike
        self.reload(merged)
        new = [k for k in todo if k not in merged]
        missing = [k for k in new if k not in self.index]
        encoded = 0
        if missing:
            self.folder.mkdir(parents=True, exist_ok=True)
            with placed(models, rank_device() if device is None else device, dtype):
                row = encode([todo[missing[0]]])[0]  # its size, not its values: a batch of one may round differently
                row_bytes = row.numel() * row.element_size()
                rows = f"{str(row.dtype).removeprefix('torch.')} {tuple(row.shape)}"
                plan = shard_plan(missing, len(new), max(1, shard_bytes // row_bytes))
                needed = len(missing) * (row_bytes + ROW_OVERHEAD)
                free = check_free_space(self.folder, needed, f"{len(missing)} {what} of {rows}")
                mine = [keys for bucket, keys in plan.items() if bucket % world == rank]
                log(f"cache {self.folder}: {len(missing)} {what} to encode in {len(plan)} shards over {world} "
                    f"rank(s), {human_bytes(needed)} ({human_bytes(row_bytes)} each, {rows}; {human_bytes(free)} "
                    f"free); rank {rank} encodes {sum(map(len, mine))} in {len(mine)} shards")
                encoded = self._encode(mine, todo, encode, batch_size,
                                       Progress(sum(map(len, mine)), what, f"cache rank {rank} of {world}", log,
                                                log_seconds), rank)
            wait_for_shards(self.folder, [self.folder / _keys_file(shard_name(k)) for k in plan.values()], log,
                            stall_seconds, log_seconds)
        if dist.is_initialized():
            dist.barrier()
        if missing or self.unmerged:
            if rank == 0:
                self._write_index()
            self.reload()
        return encoded

    def _encode(self, buckets: list[list[str]], todo: dict, encode, batch_size: int, progress: Progress,
                rank: int) -> int:
        heartbeat = self.folder / f"{HEARTBEAT}{rank}"
        for keys in buckets:
            rows = []
            for start in range(0, len(keys), batch_size):
                batch = [todo[k] for k in keys[start:start + batch_size]]
                out = encode(batch).detach().cpu()
                if out.shape[0] != len(batch):
                    raise ValueError(f"cache {self.folder}: encode gave {out.shape[0]} rows for {len(batch)} items")
                rows.append(out)
                progress.advance(len(batch))
                heartbeat.write_text(f"{progress.done}/{progress.total} {time.time()}")
            name = shard_name(keys)
            tmp = self.folder / f".{name}.partial"
            save_file({"features": torch.cat(rows).contiguous()}, tmp)
            os.replace(tmp, self.folder / name)
            _write_atomic(self.folder / _keys_file(name), json.dumps(keys))  # after its shard: it marks it done
        return progress.done

    def _write_index(self) -> None:
        """Merge every finished shard into `index.json` and record the size in `cache.json`;
        drop what killed builds left (unfinished shards, heartbeats)."""
        self.reload()
        shards = sorted({shard for shard, _ in self.index.values()})
        info = {"items": len(self.index), "shards": len(shards), "bytes": 0, "dtype": None, "shape": None}
        if shards:
            with safe_open(str(self.folder / shards[0]), framework="pt") as handle:
                first = handle.get_slice("features")
                info.update(dtype=str(first[0:1].dtype).removeprefix("torch."), shape=first.get_shape()[1:])
            info["bytes"] = sum((self.folder / s).stat().st_size for s in shards)
        if self.unmerged:
            _write_atomic(self.folder / "index.json", json.dumps(self.index, sort_keys=True, separators=(",", ":")))
        if info != self.info():
            _write_atomic(self.folder / "cache.json", json.dumps(info, indent=1))
        for leftover in [*self.folder.glob(".*.partial"), *self.folder.glob(HEARTBEAT + "*")]:
            leftover.unlink(missing_ok=True)

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under `key`."""
        if key not in self.index:
            raise KeyError(f"{key} is not in the feature cache {self.folder}; build it for these samples")
        name, row = self.index[key]
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name].get_slice("features")[row]

    def __getstate__(self):  # file handles do not travel to DataLoader workers
        return {**self.__dict__, "_handles": {}}


def _images_by_digest(samples) -> dict[str, object]:
    todo: dict[str, object] = {}
    for entry in samples:
        pairs = [entry] if isinstance(entry, tuple) else [(None, image) for image in entry.images]
        for digest, image in pairs:
            todo.setdefault(digest or image_digest(image), image)
    return todo


class VisionFeatureCache(TensorCache):
    """Vision tower features of every image of some samples, found by `image_digest`.
    `samples`: `Sample`s, or `(digest or None, image)` pairs (a prepared dataset's
    `images()`, which spares hashing the images again)."""

    def missing(self, samples) -> dict[str, object]:
        """Digest -> image for the samples' images not yet in the cache."""
        return {d: image for d, image in _images_by_digest(samples).items() if d not in self.index}

    def build(self, samples, encoder, vision_tower, layer: int, batch_size: int = 64, log=print, **job) -> int:
        """Compute and store the features of the images not cached yet, every rank its slice
        (`job`: `TensorCache.add`'s keywords: device, dtype, shard size, ...); returns how
        many this rank encoded."""
        def encode(images):
            pixels = torch.cat([encoder.images(Sample("cache", [], [image])) for image in images])
            return tower_features(vision_tower, pixels, layer)

        todo = list(_images_by_digest(samples).items())
        return self.add(todo, encode, batch_size, "images", log, models=[vision_tower], **job)


def prepare_feature_cache(root: str | os.PathLike, samples, encoder, vision_tower, layer: int, log=print, *,
                          dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                          batch_size: int = 64, **job) -> VisionFeatureCache:
    """The cache for this tower, dtype and preprocessing with every sample's images in it
    (`samples`: `Sample`s or `(digest or None, image)` pairs). Every rank calls it: each
    encodes its slice of what is missing on `device` (None: its accelerator, `rank_device`)
    in `dtype` (None: the tower's parameter dtype; give the dtype the tower runs in during
    training), then all read the finished cache. `job`: further `TensorCache.add` keywords
    (shard size, log interval, stall timeout)."""
    dtype = dtype or model_dtype(vision_tower)
    cache = VisionFeatureCache(root, feature_key(vision_tower, encoder.image_processor, layer, encoder.pad, dtype))
    added = cache.build(samples, encoder, vision_tower, layer, batch_size, log, dtype=dtype, device=device, **job)
    log(f"feature cache: {cache.describe('images')}; {added} encoded now on this rank")
    return cache
