"""Vision features computed once: while the vision tower is frozen, its output for an image
never changes, so stage 1 (and stage 2 with a frozen tower) can read it from disk instead
of running the tower every step of every epoch and every run.

A cache folder belongs to one key: the vision tower's config and weights, the selected
layer, the image processor's settings and the pad-to-square choice. Inside, images are
found by the SHA-1 of their bytes, so two records with the same picture share one row and
a renamed file is still found. Features live in safetensors shards read lazily, so a cache
larger than memory works.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmpeft.data.conversation import Sample

SHARD_ROWS = 4096


def image_digest(image) -> str:
    """SHA-1 of an image's bytes (`image` is a path or bytes)."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return hashlib.sha1(data).hexdigest()


def feature_key(vision_tower, image_processor, layer: int, pad_to_square: bool) -> str:
    """What the features depend on, hashed: tower config and weights, layer, preprocessing."""
    digest = hashlib.sha256()
    digest.update(vision_tower.config.to_json_string().encode())
    for name, tensor in sorted(vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(image_processor.to_json_string().encode())
    digest.update(json.dumps({"layer": layer, "pad_to_square": pad_to_square}).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def tower_features(vision_tower, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """Hidden states of `layer` with the class token dropped, as LLaVA feeds its connector."""
    out = vision_tower(pixel_values.to(next(vision_tower.parameters()).dtype), output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]


class TensorCache:
    """One tensor per key (an image digest, a caption's hash), stored under `root/<key>/`
    in safetensors shards that are read lazily. `add` computes only what is missing."""

    def __init__(self, root: str | os.PathLike, key: str):
        self.folder = Path(root) / key
        self.index: dict[str, list] = {}
        if (self.folder / "index.json").exists():
            self.index = json.loads((self.folder / "index.json").read_text())
        self._handles: dict[str, object] = {}

    def reload(self) -> None:
        """Read the index again (another process may have added to the cache)."""
        path = self.folder / "index.json"
        self.index = json.loads(path.read_text()) if path.exists() else {}

    def add(self, todo: list[tuple[str, object]], encode, batch_size: int = 64, what: str = "items",
            log=print) -> int:
        """Store `encode(items)` (a tensor with one row per item) for each `(key, item)` of
        `todo` whose key is not cached yet; returns how many were computed."""
        todo = [(k, item) for k, item in dict(todo).items() if k not in self.index]
        if not todo:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        shard_no = len({v[0] for v in self.index.values()})
        for start in range(0, len(todo), SHARD_ROWS):
            part = todo[start:start + SHARD_ROWS]
            rows = [encode([item for _, item in part[b:b + batch_size]]).cpu()
                    for b in range(0, len(part), batch_size)]
            name = f"shard-{shard_no:05d}.safetensors"
            tmp = self.folder / f".{name}.partial"
            save_file({"features": torch.cat(rows).contiguous()}, tmp)
            os.replace(tmp, self.folder / name)
            self.index.update({k: [name, row] for row, (k, _) in enumerate(part)})
            tmp = self.folder / ".index.json.partial"
            tmp.write_text(json.dumps(self.index))
            os.replace(tmp, self.folder / "index.json")  # written after its shard, so never points at nothing
            shard_no += 1
            log(f"cache: {start + len(part)}/{len(todo)} {what} encoded into {self.folder}")
        return len(todo)

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


class VisionFeatureCache(TensorCache):
    """Vision tower features of every image of some samples, found by `image_digest`."""

    def missing(self, samples: list[Sample]) -> dict[str, object]:
        """Digest -> image for the samples' images not yet in the cache."""
        todo = {}
        for sample in samples:
            for image in sample.images:
                digest = image_digest(image)
                if digest not in self.index:
                    todo.setdefault(digest, image)
        return todo

    def build(self, samples: list[Sample], encoder, vision_tower, layer: int, batch_size: int = 64,
              log=print) -> int:
        """Compute and store the features of the images not cached yet; returns how many."""
        def encode(images):
            pixels = torch.cat([encoder.images(Sample("cache", [], [image])) for image in images])
            return tower_features(vision_tower, pixels, layer)

        return self.add(list(self.missing(samples).items()), encode, batch_size, "images", log)


def prepare_feature_cache(root: str | os.PathLike, samples: list[Sample], encoder, vision_tower, layer: int,
                          log=print) -> VisionFeatureCache:
    """The cache for this tower and preprocessing with every sample's images in it: the
    first rank encodes what is missing while the others wait, then all read it."""
    import torch.distributed as dist

    key = feature_key(vision_tower, encoder.image_processor, layer, encoder.pad)
    first = not dist.is_initialized() or dist.get_rank() == 0
    if first:
        cache = VisionFeatureCache(root, key)
        added = cache.build(samples, vision_tower=vision_tower, encoder=encoder, layer=layer, log=log)
        log(f"feature cache: {len(cache.index)} images in {cache.folder}, {added} encoded now")
    if dist.is_initialized():
        dist.barrier()
    return VisionFeatureCache(root, key)
