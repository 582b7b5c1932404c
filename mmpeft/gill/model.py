"""GILL: an LM that reads images as a few input tokens (CLIP embedding through a linear map)
and writes them as `[IMG0]`..`[IMG7]`, whose hidden states feed a retrieval head
(contrastive against CLIP image embeddings), a generation mapper (into Stable Diffusion's
`prompt_embeds`) and a decision head (retrieve or generate).

Each training example takes two passes through the LM:

    captioning   image tokens -> caption                       LM loss
    image        caption -> [IMG0]..[IMG7]                     LM loss on [IMG0] only (data.py),
                                                               InfoNCE of the state at [IMG0],
                                                               L2 of the mapped [IMG] states to the
                                                               SD text encoder's caption encoding

    loss = caption LM + image-pass LM + contrastive + generation

GILL's code counts the image pass's LM loss twice at 0.5 (once in its retrieval pass, once
in its generation pass over the same tokens); one pass at weight 1 is the same gradient.
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
    """`x` of every rank concatenated in rank order. Only this rank's own part carries a
    gradient; the others' are constants here, as in GILL: each rank back-propagates the
    loss of its own rows against everyone's, and the data-parallel mean of the gradients
    does the rest. (A differentiable gather would also send every rank's loss back through
    the other ranks' rows, making the shared rows' gradient world-size times GILL's.) All
    ranks must pass the same number of rows."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the embeddings of all ranks: the mean of the text->image and
    image->text cross entropies, row i of `text` matching row i of `image`. Each rank computes
    it over the whole gathered batch; its gradient reaches only its own rows (see
    `gather_across_ranks`)."""
    text, image = gather_across_ranks(text), gather_across_ranks(image)
    logits = log_scale.exp() * text @ image.T
    target = torch.arange(len(text), device=text.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def generation_loss(mapped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token L2 distance between mapped embeddings and the SD text encoder's, averaged."""
    return (mapped.float() - target.float()).norm(dim=-1).mean()


@dataclass
class GillWeights:
    """GILL's: caption LM 1, image-pass LM 1 (its two passes at 0.5), contrastive 1, generation 1."""

    caption: float = 1.0
    image_lm: float = 1.0
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


class TokenRowRenormaliser:
    """GILL's step after every optimizer step: each trained token row of the LM's input
    embeddings (the `[IMG]` rows, PEFT trainable tokens) rescaled to the mean norm of the
    rows of the tokens before them, the base vocabulary's. With tied embeddings the output
    head reads the same rows. Under bf16 or ZeRO the optimizer keeps its own float32 copy
    of the rows, which the next step starts from: it is rescaled too, or the step would
    undo the renormalisation. The base rows are frozen, so their mean norm is measured on
    the first call (in the dtype training runs in) and kept: later steps touch (and under
    ZeRO-3 gather) only the trained rows."""

    def __init__(self, lm):
        embedding = lm.get_input_embeddings()
        self.layer = getattr(embedding, "token_adapter", embedding)  # under LoRA, PEFT wraps the layer
        if not hasattr(self.layer, "trainable_tokens_delta"):
            raise TypeError(f"the LM's input embeddings ({type(embedding).__name__}) have no trainable token rows")
        self.targets: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, zero3: bool = False) -> None:
        """Rescale the rows now; `zero3`: they are partitioned and gathered here."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        layer, deltas = self.layer, self.layer.trainable_tokens_delta
        gathered = [*deltas.values()] + ([] if self.targets else [layer.base_layer.weight])
        with deepspeed.zero.GatheredParameters(gathered, modifier_rank=0, enabled=zero3):
            for name, rows in deltas.items():
                if name not in self.targets:
                    base = layer.base_layer.weight[:min(layer.token_indices[name])]
                    self.targets[name] = base.float().norm(dim=-1).mean()
                target = self.targets[name]
                master = safe_get_full_fp32_param(rows)  # None when the optimizer steps the rows themselves
                source = rows.float() if master is None else master.float()
                rescaled = source * (target / source.norm(dim=-1, keepdim=True))
                if master is not None:
                    safe_set_full_fp32_param(rows, rescaled.to(master.dtype))
                rows.copy_(rescaled.to(rows.dtype))


def gill_parts(model: GILL) -> dict[str, nn.Module]:
    """The modules besides the LM that a GILL run trains and saves."""
    return {"image_input": model.image_input, "retrieval": model.retrieval, "mapper": model.mapper,
            "decision": model.decision}
