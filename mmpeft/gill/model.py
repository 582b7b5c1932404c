"""GILL: an LM that reads images as a few input tokens (CLIP embedding through a linear map)
and writes them as `[IMG0]`..`[IMG7]`, whose hidden states feed a retrieval head
(contrastive against CLIP image embeddings), a generation mapper (into Stable Diffusion's
`prompt_embeds`) and a decision head (retrieve or generate).

Each training example takes two passes through the LM:

    captioning   image tokens -> caption                       LM loss
    image        caption -> [IMG0]..[IMG7]                     LM loss on [IMG0] (see vokens.py),
                                                               InfoNCE of the state at [IMG0],
                                                               L2 of the mapped [IMG] states to the
                                                               SD text encoder's caption encoding

    loss = caption LM + 0.5 image-pass LM + contrastive + generation   (GILL's weights)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmpeft.minigpt5.model import VokenMapper
from mmpeft.models.vokens import voken_features, voken_starts


class ImageInput(nn.Module):
    """CLIP image embedding `(b, clip_dim)` -> `(b, k, llm_hidden)` input embeddings."""

    def __init__(self, clip_dim: int, llm_hidden: int, k: int = 4):
        super().__init__()
        self.k, self.llm_hidden = k, llm_hidden
        self.linear = nn.Linear(clip_dim, k * llm_hidden)

    def forward(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        return self.linear(clip_embeds).view(len(clip_embeds), self.k, self.llm_hidden)


class RetrievalHead(nn.Module):
    """Both sides projected to `d` and L2-normalised; a learnable logit scale that starts at
    1/0.07 (stored as its log)."""

    def __init__(self, llm_hidden: int, clip_dim: int, d: int = 256):
        super().__init__()
        self.text = nn.Linear(llm_hidden, d)
        self.image = nn.Linear(clip_dim, d)
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # 1-D: DeepSpeed broadcasts bytes

    def embed_text(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(states), dim=-1)

    def embed_image(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(clip_embeds), dim=-1)


class DecisionHead(nn.Module):
    """Dropout + Linear on the `[IMG0]` state: logits of (retrieve, generate)."""

    def __init__(self, llm_hidden: int, dropout: float = 0.1):
        super().__init__()
        self.dropout, self.linear = nn.Dropout(dropout), nn.Linear(llm_hidden, 2)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(states))


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """`x` of every rank concatenated in rank order; gradients flow back to each rank's part."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous()))


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the embeddings of all ranks: the mean of the text->image and
    image->text cross entropies, row i of `text` matching row i of `image`."""
    text, image = gather_across_ranks(text), gather_across_ranks(image)
    logits = log_scale.exp() * text @ image.T
    target = torch.arange(len(text), device=text.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def generation_loss(mapped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token L2 distance between mapped embeddings and the SD text encoder's, averaged."""
    return (mapped.float() - target.float()).norm(dim=-1).mean()


@dataclass
class GillWeights:
    """GILL's: caption LM 1, image-pass LM 0.5, contrastive 1, generation 1."""

    caption: float = 1.0
    image_lm: float = 0.5
    retrieval: float = 1.0
    generation: float = 1.0


class GILL(nn.Module):
    """The LM (PEFT-wrapped or not) with the image input map, the retrieval head, the
    generation mapper and the decision head; `forward(**batch)` returns the loss and its
    parts. The decision head is trained in its own step (`decision_logits`)."""

    def __init__(self, lm, image_input: ImageInput, retrieval: RetrievalHead, mapper: VokenMapper,
                 decision: DecisionHead, image_token_id: int, voken_ids: list[int], weights: GillWeights | None = None):
        super().__init__()
        self.lm, self.image_input, self.retrieval, self.mapper, self.decision = (
            lm, image_input, retrieval, mapper, decision)
        self.image_token_id, self.voken_ids = image_token_id, list(voken_ids)
        self.weights = weights or GillWeights()

    def input_embeddings(self, input_ids: torch.Tensor, clip_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's `k` placeholder tokens replaced by its mapped
        CLIP embedding (images in row-major order of their placeholders)."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id
        if clip_embeds is None or len(clip_embeds) == 0:
            if slots.any():
                raise ValueError("the batch has image tokens but no CLIP embeddings")
            return embeds
        mapped = self.image_input(clip_embeds.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
        if slots.sum() != len(mapped):
            raise ValueError(f"{int(slots.sum())} image token slots but {len(clip_embeds)} image(s) x "
                             f"{self.image_input.k} tokens")
        return embeds.masked_scatter(slots[..., None], mapped)

    def image_pass(self, input_ids, attention_mask, labels=None, clip_embeds=None):
        """`(LM output, state at [IMG0] (k, hidden), mapper input (k, 8, hidden))` for every
        voken run: the mapper reads the states at the eight [IMG] tokens plus their input
        embeddings, as GILL does. `clip_embeds`: images of the context, if any."""
        starts = voken_starts(input_ids, self.voken_ids)
        embeds = self.input_embeddings(input_ids, clip_embeds)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        n = len(self.voken_ids)
        states = voken_features(hidden, starts, n, shift=0)
        return out, states[:, 0], states + voken_features(embeds, starts, n, shift=0)

    def forward(self, input_ids, attention_mask, labels, clip_embeds, img_input_ids, img_attention_mask, img_labels,
                target_clip, caption_embeds, num_items_in_batch=None) -> dict[str, torch.Tensor]:
        cap = self.lm(inputs_embeds=self.input_embeddings(input_ids, clip_embeds), attention_mask=attention_mask,
                      labels=labels, num_items_in_batch=num_items_in_batch)
        out, at_img0, mapper_in = self.image_pass(img_input_ids, img_attention_mask, img_labels)
        if len(at_img0) != len(target_clip):
            raise ValueError(f"{len(at_img0)} [IMG] runs but {len(target_clip)} target images")
        text = self.retrieval.embed_text(at_img0)
        image = self.retrieval.embed_image(target_clip.to(text.dtype))
        parts = {"caption_loss": cap.loss, "image_lm_loss": out.loss,
                 "retrieval_loss": contrastive_loss(text, image, self.retrieval.log_scale),
                 "generation_loss": generation_loss(self.mapper(mapper_in), caption_embeds)}
        w = self.weights
        loss = (w.caption * parts["caption_loss"] + w.image_lm * parts["image_lm_loss"]
                + w.retrieval * parts["retrieval_loss"] + w.generation * parts["generation_loss"])
        return {"loss": loss, **parts}

    def decision_logits(self, at_img0: torch.Tensor) -> torch.Tensor:
        """(retrieve, generate) logits from states at `[IMG0]`."""
        return self.decision(at_img0)


def gill_parts(model: GILL) -> dict[str, nn.Module]:
    """The modules besides the LM that a GILL run trains and saves."""
    return {"image_input": model.image_input, "retrieval": model.retrieval, "mapper": model.mapper,
            "decision": model.decision}
