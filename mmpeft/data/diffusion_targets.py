"""What the frozen Stable Diffusion parts make of the training targets: VAE latents of the
target images and the text encoder's encoding of their captions. Both never change while
those parts are frozen, so they can be computed once into a `TensorCache` and read back
every epoch and every run (`cache_root`), or computed when a batch needs them (None).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from PIL import Image

from mmpeft.data.conversation import open_image
from mmpeft.data.feature_cache import TensorCache, image_digest


def _weights_key(*modules, extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for module in modules:
        digest.update(module.config.to_json_string().encode() if hasattr(module.config, "to_json_string")
                      else str(dict(module.config)).encode())
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
    `key(item)` in a `TensorCache` when one is given, else computed on each call."""

    what, batch_size = "items", 64

    def __init__(self, cache: TensorCache | None):
        self.cache = cache

    def key(self, item) -> str:
        return image_digest(item)

    def encode(self, items: list) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, items: list, log=print) -> int:
        """Encode the items the cache lacks (no-op without a cache); returns how many."""
        if self.cache is None:
            return 0
        return self.cache.add([(self.key(it), it) for it in items], self.encode, self.batch_size, self.what, log)

    def __call__(self, items: list) -> torch.Tensor:
        if self.cache is None:
            return self.encode(items)
        return torch.stack([self.cache.get(self.key(it)) for it in items])


class LatentTargets(FrozenOutputs):
    """Scaled VAE latents (posterior mean x `scaling_factor`) of target images, cached
    under `cache_root` when one is given."""

    what = "target images"

    def __init__(self, vae, size: int, cache_root: str | os.PathLike | None = None):
        self.vae, self.size = vae, size
        super().__init__(TensorCache(cache_root, "latents-" + _weights_key(vae, extra=str(size)))
                         if cache_root else None)

    @torch.no_grad()
    def encode(self, images: list) -> torch.Tensor:
        pixels = torch.stack([image_to_sd(open_image(im, str(im)[:80]), self.size) for im in images])
        weight = next(self.vae.parameters())
        latents = self.vae.encode(pixels.to(weight.device, weight.dtype)).latent_dist.mean
        return latents * self.vae.config.scaling_factor


class CaptionTargets(FrozenOutputs):
    """The SD text encoder's last hidden state for captions, padded to the tokenizer's
    length as the Stable Diffusion pipeline encodes prompts; cached when asked."""

    what, batch_size = "captions", 256

    def __init__(self, tokenizer, text_encoder, cache_root: str | os.PathLike | None = None):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        super().__init__(TensorCache(cache_root, "captions-" + _weights_key(text_encoder,
                                                                            extra=tokenizer.name_or_path))
                         if cache_root else None)

    def key(self, text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]


def prepare_targets(targets: FrozenOutputs, items: list, log=print) -> None:
    """Fill the targets' cache with `items` on the first rank while the others wait, then
    let every rank read the finished index."""
    import torch.distributed as dist

    if targets.cache is None:
        return
    if not dist.is_initialized() or dist.get_rank() == 0:
        added = targets.prepare(items, log=log)
        log(f"cache: {len(targets.cache.index)} entries in {targets.cache.folder}, {added} encoded now")
    if dist.is_initialized():
        dist.barrier()
    targets.cache.reload()
