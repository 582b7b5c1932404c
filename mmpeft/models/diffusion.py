"""Stable Diffusion sampling from prompt embeddings (mapped vokens or `[IMG]` states) or from
captions, shared by the families that draw."""

from __future__ import annotations

import logging

import torch

# diffusers' pipelines import transformers' CLIP and SigLIP image processors for IP-adapters,
# which mmpeft never uses; without torchvision transformers notes that those fall back to PIL
_UNUSED_PROCESSOR_NOTE = "requires torchvision (not installed); falling back to"


def _not_the_unused_processor_note(record: logging.LogRecord) -> bool:
    return _UNUSED_PROCESSOR_NOTE not in record.getMessage()


def stable_diffusion_pipeline_class():
    """diffusers' `StableDiffusionPipeline`, imported without transformers' note about the
    IP-adapter image processors it loads and mmpeft never uses (other notes still show)."""
    notes = logging.getLogger("transformers.utils.import_utils")
    notes.addFilter(_not_the_unused_processor_note)
    try:
        from diffusers import StableDiffusionPipeline
    finally:
        notes.removeFilter(_not_the_unused_processor_note)
    return StableDiffusionPipeline


@torch.no_grad()
def generate_images(pipeline, conditions: torch.Tensor, negative: torch.Tensor | None, guidance: float,
                    steps: int = 25, seed: int = 0, batch_size: int = 32) -> list:
    """Stable Diffusion images from mapped conditions (`prompt_embeds`), with
    classifier-free guidance against `negative` when `guidance` > 1."""
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    images = []
    for b in range(0, len(conditions), batch_size):
        cond = conditions[b:b + batch_size]
        neg = None if negative is None else negative.expand_as(cond)
        images += pipeline(prompt_embeds=cond, negative_prompt_embeds=neg, guidance_scale=guidance,
                           num_inference_steps=steps, height=size, width=size,
                           generator=torch.Generator().manual_seed(seed + b)).images
    return images



@torch.no_grad()
def generate_from_captions(pipeline, captions: list[str], guidance: float, steps: int = 25, seed: int = 0,
                           batch_size: int = 32) -> list:
    """Stable Diffusion given the captions themselves (the baseline without an LM)."""
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    images = []
    for b in range(0, len(captions), batch_size):
        images += pipeline(prompt=captions[b:b + batch_size], guidance_scale=guidance, num_inference_steps=steps,
                           height=size, width=size, generator=torch.Generator().manual_seed(seed + b)).images
    return images
