"""Tiny CLIP: `CLIPModel` built from a config in code, trained contrastively on the world."""

from __future__ import annotations

import random

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    get_cosine_schedule_with_warmup,
)

from mmpeft.eval.clip_scores import encode_images, encode_texts


def tiny_clip_config(tokenizer: CLIPTokenizer, image_size: int = 64) -> CLIPConfig:
    """4-layer ViT with 8 px patches and a 3-layer text tower, both 128 wide."""
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=image_size, patch_size=16, hidden_size=128, intermediate_size=256,
                  num_hidden_layers=4, num_attention_heads=4)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)


def tiny_clip_processor(tokenizer: CLIPTokenizer, image_size: int = 64) -> CLIPProcessor:
    """CLIP's preprocessing (resize, centre crop, CLIP mean and std) at the tiny size."""
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def train_clip(model: CLIPModel, tokenizer: CLIPTokenizer, pixel_values: torch.Tensor,
               captions: list[list[str]], steps: int, batch_size: int = 128, lr: float = 1e-3,
               seed: int = 0, log=print) -> list[float]:
    """Symmetric InfoNCE over image-caption batches; one random caption of each image per
    step. Returns the loss of every step."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(optim, max(1, steps // 20), steps)
    losses = []
    model.train()
    for step in range(steps):
        idx = rng.sample(range(len(captions)), min(batch_size, len(captions)))
        texts = [rng.choice(captions[i]) for i in idx]
        out = model(**tokenizer(texts, padding=True, return_tensors="pt"),
                    pixel_values=pixel_values[idx], return_loss=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"clip step {step}/{steps} loss {out.loss.item():.4f}")
    model.eval()
    return losses


@torch.no_grad()
def clip_recall(model: CLIPModel, tokenizer: CLIPTokenizer, pixel_values: torch.Tensor,
                texts: list[str]) -> dict:
    """Image-to-text and text-to-image recall@1 where the i-th text belongs to the i-th
    image, next to chance (1 / number of candidates)."""
    img = encode_images(model, pixel_values)
    txt = torch.cat([encode_texts(model, tokenizer, texts[i:i + 256]) for i in range(0, len(texts), 256)])
    sim = img @ txt.T
    target = torch.arange(len(texts))
    return {
        "image_to_text_r1": (sim.argmax(1) == target).float().mean().item(),
        "text_to_image_r1": (sim.argmax(0) == target).float().mean().item(),
        "chance_r1": 1 / len(texts),
        "candidates": len(texts),
    }
