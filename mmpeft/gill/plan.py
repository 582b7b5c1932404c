"""GILL's parts for `mmpeft plan` (`mmpeft.train.plan_parts` holds the arithmetic): its heads
and generation mapper, counted on the meta device; CLIP and Stable Diffusion on the host."""

from __future__ import annotations

from mmpeft.minigpt5.plan import mapper_sizes
from mmpeft.train.plan import LMSizes, VisionSizes
from mmpeft.train.plan_parts import DiffusionSizes, RecipeParts


def gill_parts(lm: LMSizes, clip: VisionSizes, diffusion: DiffusionSizes, mapper: dict, n_vokens: int,
               image_tokens: int, retrieval_dim: int, joined_captions: bool) -> RecipeParts:
    """GILL's parts: the image input map (CLIP's embedding to `image_tokens` LM inputs), the
    retrieval head and the generation mapper (`mapper`: `VokenMapper`'s d_model, heads,
    encoder_layers, decoder_layers, ff; one linear layer in) train, the decision head waits
    for its own step; CLIP and Stable Diffusion stay on the host. `joined_captions`: the
    captioning pass may join two captions (`data.concat_captions` > 0), twice the tokens."""
    import torch

    from mmpeft.gill.model import DecisionHead, ImageInput, RetrievalHead

    with torch.device("meta"):
        heads = ImageInput(clip.hidden, lm.hidden, image_tokens), RetrievalHead(lm.hidden, clip.hidden, retrieval_dim)
        decision = DecisionHead(lm.hidden)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    m = mapper_sizes(lm.hidden, diffusion.width, diffusion.context, n_vokens, **mapper, input_layers=1)
    return RecipeParts("GILL", gpu_frozen=count(decision), trained=sum(map(count, heads)) + m.params,
                       host_only=clip.params + diffusion.unet + diffusion.vae + diffusion.text_encoder,
                       passes=(2 if joined_captions else 1, 1), mapper=m)


def plan_parts(lm: LMSizes, vision: VisionSizes, diffusion: DiffusionSizes, model: dict,
               data: dict) -> tuple[RecipeParts, VisionSizes, int]:
    """`Family.plan_parts` for a GILL config's `model` and `data` sections: the parts, no
    vision tower on the GPU (CLIP stays on the host: its embeddings are inputs and targets)
    and no connector."""
    parts = gill_parts(lm, vision, diffusion, model["mapper"], model["n_vokens"], model["image_tokens"],
                       model["retrieval_dim"], data.get("concat_captions", 0) > 0)
    return parts, VisionSizes(0, 0, 0), 0
