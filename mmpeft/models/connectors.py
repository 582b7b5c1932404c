"""Connectors that turn a vision tower's patch features into a fixed number of LM input
embeddings, whatever the number of patches: BLIP-2's Q-Former and Flamingo's Perceiver
Resampler. Both end in a linear map to the LM's width, named `projection`, which
MiniGPT-4's setting trains alone.

Each takes `(batch, patches, vision width)` and returns `(batch, tokens, LM width)`, so the
LLaVA model reads them as it reads its MLP connector's output.
"""

from __future__ import annotations

import torch
from torch import nn

# BLIP-2: 32 learned queries, a 12-layer BERT-base-sized Q-Former with cross-attention to
# the image features in every other layer; Flamingo: 64 latents, 6 resampler layers
QFORMER_DEFAULTS = {"queries": 32, "layers": 12, "hidden": 768, "heads": 12, "cross_attention_every": 2}
RESAMPLER_DEFAULTS = {"latents": 64, "layers": 6, "heads": 8, "head_width": 64}


def _options(given: dict | None, defaults: dict, name: str) -> dict:
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ValueError(f"connector {name}: unknown option(s) {unknown}; its options: {', '.join(defaults)}")
    return {**defaults, **(given or {})}


class QFormerConnector(nn.Module):
    """Learned queries that attend to each other and, through cross-attention, to the
    frozen image features (transformers' `Blip2QFormerModel`), then a linear map into the
    LM. The parameter names follow BLIP-2's (`query_tokens`, `qformer.*`)."""

    def __init__(self, vision_width: int, lm_width: int, options: dict | None = None):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        o = _options(options, QFORMER_DEFAULTS, "qformer")
        config = Blip2QFormerConfig(hidden_size=o["hidden"], num_hidden_layers=o["layers"],
                                    num_attention_heads=o["heads"], intermediate_size=4 * o["hidden"],
                                    encoder_hidden_size=vision_width,
                                    cross_attention_frequency=o["cross_attention_every"])
        self.query_tokens = nn.Parameter(torch.zeros(1, o["queries"], o["hidden"]))
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        self.qformer = Blip2QFormerModel(config)
        self.projection = nn.Linear(o["hidden"], lm_width)
        self.tokens = o["queries"]

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1).to(image_features.dtype)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_features).last_hidden_state
        return self.projection(out)


class _ResamplerLayer(nn.Module):
    """Latents attend to the image features and to themselves (keys and values are both,
    concatenated), then a feed-forward block; both residual, pre-norm."""

    def __init__(self, width: int, heads: int, head_width: int):
        super().__init__()
        self.heads, self.head_width = heads, head_width
        self.norm_media, self.norm_latents = nn.LayerNorm(width), nn.LayerNorm(width)
        inner = heads * head_width
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width, bias=False), nn.GELU(),
                                nn.Linear(4 * width, width, bias=False))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_width)).transpose(1, 2)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, normed = self.norm_media(media), self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([media, normed], dim=1)).chunk(2, dim=-1)
        attended = nn.functional.scaled_dot_product_attention(self._split(self.to_q(normed)), self._split(k),
                                                              self._split(v))
        latents = latents + self.to_out(attended.transpose(1, 2).flatten(2))
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver Resampler: a fixed number of learned latents, refined by
    `layers` blocks of attention over the image features, a final LayerNorm, then a
    linear map into the LM. (Flamingo also adds a learned embedding per video frame; with
    one image per `<image>` there is one frame, so it is left out.)"""

    def __init__(self, vision_width: int, lm_width: int, options: dict | None = None):
        super().__init__()
        o = _options(options, RESAMPLER_DEFAULTS, "perceiver_resampler")
        self.latents = nn.Parameter(torch.randn(o["latents"], vision_width) * 0.02)
        self.layers = nn.ModuleList(_ResamplerLayer(vision_width, o["heads"], o["head_width"])
                                    for _ in range(o["layers"]))
        self.norm = nn.LayerNorm(vision_width)
        self.projection = nn.Linear(vision_width, lm_width)
        self.tokens = o["latents"]

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(image_features.dtype).expand(image_features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(image_features, latents)
        return self.projection(self.norm(latents))


RESAMPLING = {"qformer": QFormerConnector, "perceiver_resampler": PerceiverResampler}
