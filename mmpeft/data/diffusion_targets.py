"""What the frozen Stable Diffusion parts make of the training targets: VAE latents of the
target images and the text encoder's encoding of their captions. Both never change while
those parts are frozen, so they can be computed once into a `TensorCache` and read back
every epoch and every run (`cache_root`), or computed when a batch needs them (None).
A cache is keyed by the frozen model's weights and the dtype it runs in, and built by every
rank on its own accelerator (`prepare_targets`).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from PIL import Image

from mmpeft.data.cache_job import model_dtype
from mmpeft.data.conversation import open_image
from mmpeft.data.feature_cache import SHARD_BYTES, TensorCache, image_digest


def _weights_key(*modules, extra: str = "", dtype: torch.dtype | None = None) -> str:
    """The modules' configs and weights, `extra` and the dtype they run in (None: the first
    module's parameter dtype), hashed."""
    digest = hashlib.sha256(extra.encode())
    digest.update(str(dtype or model_dtype(modules[0])).encode())
    for module in modules:
        config = getattr(module, "config", None)  # a module without one is described by its layers
        digest.update(config.to_json_string().encode() if hasattr(config, "to_json_string")
                      else str(dict(config) if config is not None else module).encode())
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def sd_resolution(pipeline) -> int:
    """The pixel size the pipeline generates by default: UNet sample size x VAE downscale."""
    return pipeline.unet.config.sample_size * pipeline.vae_scale_factor


def image_to_sd(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> `(3, size, size)` in [-1, 1]: shorter side resized to `size`, centre crop."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BOX)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


class FrozenOutputs:
    """Outputs of a frozen model for items (images, captions), one row per item, found by
    `key(item)` in a `TensorCache` when one is given, else computed on each call. A cache
    is built with the frozen models in `dtype` (None: as they are)."""

    what, batch_size, shard_bytes = "items", 64, SHARD_BYTES

    def __init__(self, cache: TensorCache | None, dtype: torch.dtype | None = None):
        self.cache, self.dtype = cache, dtype

    def key(self, item) -> str:
        return image_digest(item)

    def encode(self, items: list) -> torch.Tensor:
        raise NotImplementedError

    def frozen_models(self) -> list[torch.nn.Module]:
        """The models `encode` runs (every module attribute), placed for a cache build."""
        return [v for v in vars(self).values() if isinstance(v, torch.nn.Module)]

    def prepare(self, items: list, log=print, device: torch.device | str | None = None, **job) -> int:
        """Encode this rank's slice of the items the cache lacks on `device` (None: the rank's
        accelerator) and wait for the other ranks' (no-op without a cache); returns how many
        this rank encoded. `job`: further `TensorCache.add` keywords."""
        if self.cache is None:
            return 0
        return self.cache.add([(self.key(it), it) for it in items], self.encode, self.batch_size, self.what, log,
                              models=self.frozen_models(), device=device, dtype=self.dtype,
                              shard_bytes=self.shard_bytes, **job)

    def __call__(self, items: list) -> torch.Tensor:
        if self.cache is None:
            return self.encode(items)
        return torch.stack([self.cache.get(self.key(it)) for it in items])


class LatentTargets(FrozenOutputs):
    """Scaled VAE latents (posterior mean x `scaling_factor`) of target images, cached
    under `cache_root` when one is given, computed in `dtype` (None: the VAE's)."""

    what = "target images"

    def __init__(self, vae, size: int, cache_root: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None):
        self.vae, self.size = vae, size
        super().__init__(TensorCache(cache_root, "latents-" + _weights_key(vae, extra=str(size), dtype=dtype))
                         if cache_root else None, dtype)

    @torch.no_grad()
    def encode(self, images: list) -> torch.Tensor:
        pixels = torch.stack([image_to_sd(open_image(im, str(im)[:80]), self.size) for im in images])
        weight = next(self.vae.parameters())
        latents = self.vae.encode(pixels.to(weight.device, weight.dtype)).latent_dist.mean
        return latents * self.vae.config.scaling_factor


class CaptionTargets(FrozenOutputs):
    """The SD text encoder's last hidden state for captions, padded to the tokenizer's
    length as the Stable Diffusion pipeline encodes prompts; cached when asked, computed in
    `dtype` (None: the text encoder's)."""

    what, batch_size = "captions", 256

    def __init__(self, tokenizer, text_encoder, cache_root: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        key = _weights_key(text_encoder, extra=tokenizer.name_or_path, dtype=dtype)
        super().__init__(TensorCache(cache_root, "captions-" + key) if cache_root else None, dtype)

    def key(self, text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]


def prepare_targets(targets: FrozenOutputs, items: list, log=print, device: torch.device | str | None = None,
                    **job) -> None:
    """Fill the targets' cache with `items`: every rank calls it and encodes its slice of
    what is missing on `device` (None: its accelerator, `rank_device`), in the targets'
    dtype, then all read the finished cache (see `TensorCache.add` for the job and `job`)."""
    if targets.cache is None:
        return
    added = targets.prepare(items, log=log, device=device, **job)
    log(f"cache: {targets.cache.describe(targets.what)}; {added} encoded now on this rank")
