"""Tiny Stable Diffusion: VAE, UNet and scheduler trained on the world, saved as a
`StableDiffusionPipeline` folder with the tiny CLIP text encoder and tokenizer.

Choices that decide whether samples follow the caption: no sample clipping in the
scheduler, a frozen text encoder, an EMA of the UNet weights, the pooled text embedding
added to the timestep embedding (`addition_embed_type="text"`, which the stock pipeline
feeds), and 10% empty-prompt dropout so classifier-free guidance has an unconditional
model to push away from.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import get_cosine_schedule_with_warmup

from mmpeft.models.diffusion import stable_diffusion_pipeline_class
from mmpeft.tiny.world.scene import BACKGROUND, COLOURS, COLUMNS, ROWS


def tiny_vae(sample_size: int = 32) -> AutoencoderKL:
    """Three levels, so a 32 px image becomes a 4 x 8 x 8 latent."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=sample_size, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 32], norm_num_groups=8,
    )


def tiny_unet(cross_attention_dim: int, sample_size: int = 8) -> UNet2DConditionModel:
    """Cross-attention at both resolutions; pooled text embedding joins the time embedding."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=16, addition_embed_type="text", addition_embed_type_num_heads=4,
    )


def noise_scheduler() -> DDPMScheduler:
    """Stable Diffusion's beta schedule, without sample clipping (clipping ruins tiny latents)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, prediction_type="epsilon")


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 2e-3,
              kl_weight: float = 1e-6, seed: int = 0, log=print) -> list[float]:
    """Reconstruction (MSE) plus a small KL term; `images` are in [-1, 1]. Afterwards the
    config's `scaling_factor` is set so scaled latents have unit standard deviation."""
    gen = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = get_cosine_schedule_with_warmup(optim, max(1, steps // 20), steps)
    losses = []
    vae.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        std = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)]).std()
    vae.register_to_config(scaling_factor=float(1 / std))
    return losses


def train_unet(unet: UNet2DConditionModel, latents: torch.Tensor, text_embeds: torch.Tensor,
               caption_index: list[list[int]], empty_embed: torch.Tensor, steps: int, batch_size: int = 64,
               lr: float = 1e-3, cfg_dropout: float = 0.1, ema_decay: float = 0.999, seed: int = 0,
               log=print) -> tuple[UNet2DConditionModel, list[float]]:
    """Epsilon-prediction MSE on scaled `latents`; the i-th latent's captions are the rows
    `caption_index[i]` of `text_embeds`. Returns the EMA copy of the UNet and the losses."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    scheduler = noise_scheduler()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optim = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(optim, max(1, steps // 20), steps)
    losses = []
    unet.train()
    for step in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        cond = torch.stack([empty_embed if rng.random() < cfg_dropout else text_embeds[rng.choice(caption_index[i])]
                            for i in idx.tolist()])
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        pred = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}")
    return ema.eval(), losses


def make_pipeline(vae, unet, text_encoder, tokenizer):
    """A stock `StableDiffusionPipeline` (DDIM sampling, no safety checker)."""
    scheduler = DDIMScheduler.from_config(noise_scheduler().config, steps_offset=1, set_alpha_to_one=False)
    pipe = stable_diffusion_pipeline_class()(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_attributes(image) -> dict | None:
    """Read colour, shape and grid cell of the one object in an RGB image from its pixels.

    Foreground is what differs clearly from the background; colour is the nearest palette
    colour to its mean; shape is judged by how much of its bounding box it fills (square
    1.0, circle 0.79, triangle 0.5). Returns None when no object is visible.
    """
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    fg = (x - torch.tensor(BACKGROUND, dtype=torch.float32)).abs().amax(-1) > 60
    if fg.sum() < 3:
        return None
    ys, xs = torch.nonzero(fg, as_tuple=True)
    mean = x[fg].mean(0)
    colour = min(COLOURS, key=lambda c: ((mean - torch.tensor(COLOURS[c], dtype=torch.float32)) ** 2).sum())
    fill = fg.sum().item() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item()
    shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    cy, cx = ys.float().mean().item() / image.height, xs.float().mean().item() / image.width
    return {"colour": colour, "shape": shape, "where": f"{ROWS[min(2, int(cy * 3))]} {COLUMNS[min(2, int(cx * 3))]}"}
