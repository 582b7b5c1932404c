"""MiniGPT-5's interleaved generation: text until the vokens, then an image drawn from them."""

from __future__ import annotations

import torch

from mmpeft.data.conversation import Sample
from mmpeft.models.diffusion import generate_images
from mmpeft.train.placement import device_of


def prompt_tensors(model, encoder, prompt: Sample) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(input ids (1, n), pixel values or None)` of a prompt conversation, on the model's device."""
    device = device_of(model)
    pixels = encoder.images(prompt)
    return (torch.tensor([encoder.encode_prompt(prompt)], device=device),
            None if pixels is None else pixels.to(device))


@torch.no_grad()
def interleaved_generate(model, pipeline, encoder, prompt: Sample, guidance: float, max_new_tokens: int = 48,
                         steps: int = 25, seed: int = 0) -> tuple[str, object | None]:
    """Greedy text for a prompt conversation and, when the LM emits `[IMG0]`, the image
    that Stable Diffusion draws from the run's mapped states (the rest of the run is
    appended by rule), with guidance against the learned unconditional embedding.
    Returns `(text before the vokens, image or None)`."""
    ids, pixels = prompt_tensors(model, encoder, prompt)
    device = ids.device
    out = model.llava.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                               max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    first = model.voken_ids[0]
    text_ids = out[: out.index(first)] if first in out else out
    text = encoder.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
    if first not in out:
        return text, None
    full = torch.tensor([ids[0].tolist() + text_ids + model.voken_ids], device=device)
    states, _ = model.voken_states({"input_ids": full, "attention_mask": torch.ones_like(full),
                                    "pixel_values": pixels})
    cond = model.mapper(states)
    image = generate_images(pipeline, cond, model.mapper.unconditional(len(model.voken_ids)), guidance, steps,
                            seed)[0]
    return text, image
