"""CLIP embeddings for the figures that compare images and texts (L2-normalised, so a dot
product is the cosine similarity)."""

from __future__ import annotations

import torch
from transformers import CLIPModel, CLIPTokenizer

from mmpeft.train.placement import device_of, to_device


def encode_texts(model: CLIPModel, tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings, on the model's device."""
    batch = to_device(dict(tokenizer(texts, padding=True, return_tensors="pt")), device_of(model))
    feats = model.get_text_features(**batch)
    feats = getattr(feats, "pooler_output", feats)
    return torch.nn.functional.normalize(feats, dim=-1)



def encode_images(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings, on the model's device."""
    feats = model.get_image_features(pixel_values=pixel_values.to(device_of(model)))
    feats = getattr(feats, "pooler_output", feats)
    return torch.nn.functional.normalize(feats, dim=-1)


def clip_image_embeddings(clip, processor, images: list) -> torch.Tensor:
    """L2-normalised CLIP image embeddings of PIL images."""
    with torch.no_grad():
        return encode_images(clip, processor(images=images, return_tensors="pt")["pixel_values"])


def clip_text_embeddings(clip, processor, texts: list[str]) -> torch.Tensor:
    """L2-normalised CLIP text embeddings."""
    with torch.no_grad():
        return encode_texts(clip, processor.tokenizer, texts)
