"""Flamingo's fusion on any causal LM: the LM stays frozen, a Perceiver Resampler turns
each image's patch features into a fixed number of visual tokens, and gated
cross-attention layers inserted before the LM's decoder layers let the text read them.

- Each text token attends to the visual tokens of the most recent `<image>` at or before
  it; tokens before the first image attend to none (their cross-attention output is 0).
- Each inserted layer is a cross-attention block and a feed-forward block, each added to
  the residual stream through `tanh(gate)` with the gate at 0, so at initialisation the
  model computes exactly what the frozen LM computes.
- `<image>` stays one token in the text; the visual tokens never enter the sequence.

The inserted layers run as forward pre-hooks of the LM's decoder layers, so the LM's own
code, cache and `generate` are used unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from mmpeft.models.connectors import PerceiverResampler

XATTN_DEFAULTS = {"every": 1, "heads": 8, "head_width": 64}


class GatedCrossAttention(nn.Module):
    """One inserted layer: gated cross-attention to the visual tokens, then a gated
    feed-forward block (pre-norm, no biases, gates tanh(0) = 0 at initialisation)."""

    def __init__(self, width: int, heads: int, head_width: int):
        super().__init__()
        self.heads, self.head_width = heads, head_width
        inner = heads * head_width
        self.norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width, bias=False), nn.GELU(),
                                nn.Linear(4 * width, width, bias=False))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_width)).transpose(1, 2)

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_index: torch.Tensor) -> torch.Tensor:
        """`x` (batch, tokens, width); `media` (batch, images, visual tokens, width);
        `media_index` (batch, tokens): which image (1-based) each token reads, 0 for none."""
        images, per_image = media.shape[1], media.shape[2]
        owner = torch.arange(1, images + 1, device=x.device).repeat_interleave(per_image)
        allowed = media_index[:, :, None] == owner[None, None, :]  # (batch, tokens, images * visual tokens)
        reads = allowed.any(-1, keepdim=True)
        # a token that reads no image attends to every visual token (a mask row of all False would
        # give NaN) and its output is zeroed below
        mask = (allowed | ~reads)[:, None]
        k, v = self.to_kv(media.flatten(1, 2).to(x.dtype)).chunk(2, dim=-1)
        attended = nn.functional.scaled_dot_product_attention(self._split(self.to_q(self.norm(x))), self._split(k),
                                                              self._split(v), attn_mask=mask)
        x = x + torch.tanh(self.attn_gate) * self.to_out(attended.transpose(1, 2).flatten(2)) * reads
        return x + torch.tanh(self.ff_gate) * self.ff(x)


def decoder_layers(lm) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (LLaMA, Mistral, Qwen, GPT-NeoX ...)."""
    for name in ("layers", "h", "decoder.layers"):
        layers = lm.base_model.get_submodule(name) if _has(lm.base_model, name) else None
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"{type(lm).__name__}: no decoder layer list found (looked for layers, h, decoder.layers)")


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


class FlamingoLM(nn.Module):
    """A frozen causal LM that reads images through a Perceiver Resampler and gated
    cross-attention layers (before every `every`-th decoder layer). `forward` and `generate`
    take the LM's arguments plus `pixel_values`, one image per `<image>` token, in order."""

    def __init__(self, lm, vision_tower: nn.Module, image_token_id: int, vision_feature_layer: int = -2,
                 resampler_options: dict | None = None, xattn_options: dict | None = None):
        super().__init__()
        unknown = sorted(set(xattn_options or {}) - set(XATTN_DEFAULTS))
        if unknown:
            raise ValueError(f"gated_xattn: unknown option(s) {unknown}; its options: {', '.join(XATTN_DEFAULTS)}")
        o = {**XATTN_DEFAULTS, **(xattn_options or {})}
        width = lm.config.hidden_size
        self.lm, self.vision_tower = lm, vision_tower
        self.image_token_id, self.vision_feature_layer = image_token_id, vision_feature_layer
        self.config = lm.config
        self.resampler = PerceiverResampler(vision_tower.config.hidden_size, width, resampler_options)
        layers = decoder_layers(lm)
        self.xattn_at = list(range(0, len(layers), o["every"]))
        self.xattn = nn.ModuleList(GatedCrossAttention(width, o["heads"], o["head_width"]) for _ in self.xattn_at)
        self._state: dict | None = None
        for block, at in zip(self.xattn, self.xattn_at, strict=True):
            layers[at].register_forward_pre_hook(self._hook(block), with_kwargs=True)

    def _hook(self, block: GatedCrossAttention):
        def run(_, args, kwargs):
            if self._state is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            index = self._state["index"]
            if hidden.shape[1] != index.shape[1]:  # generating with a cache: new tokens read the last image
                index = self._state["last"][:, None].expand(-1, hidden.shape[1])
            hidden = block(hidden, self._state["media"], index)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        return run

    def visual_tokens(self, pixel_values: torch.Tensor | None = None,
                      image_features: torch.Tensor | None = None) -> torch.Tensor:
        """(images, visual tokens, LM width): the resampled features of the tower's
        `vision_feature_layer`, class token dropped; or of `image_features`, those
        features read from a cache."""
        if image_features is None:
            out = self.vision_tower(pixel_values.to(next(self.vision_tower.parameters()).dtype),
                                    output_hidden_states=True)
            image_features = out.hidden_states[self.vision_feature_layer][:, 1:]
        return self.resampler(image_features.to(self.resampler.latents.dtype))

    def _media(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
               image_features: torch.Tensor | None = None) -> dict | None:
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(1)
        images = pixel_values if image_features is None else image_features
        if images is None or counts.sum() == 0:
            if counts.sum():
                raise ValueError(f"{int(counts.sum())} <image> token(s) but no pixel_values")
            return None
        if int(counts.sum()) != images.shape[0]:
            raise ValueError(f"{int(counts.sum())} <image> token(s) but {images.shape[0]} image(s)")
        tokens = self.visual_tokens(pixel_values, image_features)
        media = tokens.new_zeros(input_ids.shape[0], int(counts.max()), *tokens.shape[1:])
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(counts)
        slots = torch.cat([torch.arange(int(c), device=input_ids.device) for c in counts])
        media[rows, slots] = tokens
        index = is_image.long().cumsum(1)
        return {"media": media, "index": index, "last": index[:, -1]}

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, **kwargs):
        self._state = self._media(input_ids, pixel_values, image_features)
        try:
            return self.lm(input_ids=input_ids, **kwargs)
        finally:
            self._state = None

    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs):
        self._state = self._media(input_ids, pixel_values)
        try:
            return self.lm.generate(input_ids=input_ids, **kwargs)
        finally:
            self._state = None

    def trainable_parts(self) -> dict[str, nn.Module]:
        """What Flamingo trains: the resampler and the inserted layers (the LM and the tower stay frozen)."""
        return {"resampler": self.resampler, "xattn": self.xattn}


