"""MiniGPT-5's parts for `mmpeft plan` (`mmpeft.train.plan_parts` holds the arithmetic): the
voken mapper, counted on the meta device, and the frozen UNet beside the LLaVA model."""

from __future__ import annotations

from mmpeft.train.plan import LMSizes, VisionSizes, connector_params
from mmpeft.train.plan_parts import DiffusionSizes, MapperSizes, RecipeParts


def mapper_sizes(llm_hidden: int, out_dim: int, n_query: int, n_vokens: int, d_model: int, heads: int,
                 encoder_layers: int, decoder_layers: int, ff: int, input_layers: int = 2,
                 trained: tuple[str, ...] = ("mlp", "query", "transformer")) -> MapperSizes:
    """The sizes of MiniGPT-5's and GILL's `VokenMapper` (GILL: `input_layers=1`), built on
    the meta device; `trained` names the parts (`mapper_parts`: mlp, query, transformer)
    that train."""
    import torch

    from mmpeft.minigpt5.model import VokenMapper, mapper_parts

    with torch.device("meta"):
        mapper = VokenMapper(llm_hidden, out_dim, n_query, d_model, heads, encoder_layers, decoder_layers, ff,
                             input_layers)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return MapperSizes(count(mapper), sum(count(m) for k, m in mapper_parts(mapper).items() if k in trained),
                       llm_hidden, out_dim, n_query, n_vokens, d_model, ff, encoder_layers, decoder_layers)


def minigpt5_parts(lm: LMSizes, vision: VisionSizes, diffusion: DiffusionSizes, mapper: dict,
                   mapper_trainable: dict, n_vokens: int, tower_images: int) -> RecipeParts:
    """MiniGPT-5's parts besides the LLaVA model: the mapper (`mapper` as for GILL, two linear
    layers in; `mapper_trainable` says which of mlp, query, transformer train) and the frozen
    UNet on the GPU, the VAE and text encoder on the host. `tower_images`: images per sample
    that go through the CLIP tower (stage 2's context images without a feature cache)."""
    trained = tuple(part for part, how in mapper_trainable.items() if how == "full")
    m = mapper_sizes(lm.hidden, diffusion.width, diffusion.context, n_vokens, **mapper, trained=trained)
    return RecipeParts("MiniGPT-5", gpu_frozen=m.params - m.trained + diffusion.unet, trained=m.trained,
                       host_only=diffusion.vae + diffusion.text_encoder, passes=(1,), mapper=m, diffusion=diffusion,
                       vision=vision, tower_images=tower_images)


def plan_parts(lm: LMSizes, vision: VisionSizes, diffusion: DiffusionSizes, model: dict,
               data: dict) -> tuple[RecipeParts, VisionSizes, int]:
    """`Family.plan_parts` for a MiniGPT-5 config's `model` and `data` sections: the parts,
    the vision tower on the GPU and the connector's parameters. Stage 2's stories show
    images, at most as many as `data.max_length` holds (and `data.history` allows), through
    the tower unless `data.feature_cache` reads their features."""
    fit = data["max_length"] // vision.image_tokens
    shown = min(fit, data["history"] + 1) if isinstance(data.get("history"), int) else fit
    images = shown if "tasks" in data and not data.get("feature_cache") else 0
    parts = minigpt5_parts(lm, vision, diffusion, model["mapper"], model["mapper_trainable"], model["n_vokens"],
                           images)
    return parts, vision, connector_params(model["connector"], vision.hidden, lm.hidden)
