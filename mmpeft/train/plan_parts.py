"""What a GILL or MiniGPT-5 run holds besides a LLaVA-style model, for `mmpeft plan`.

Where each recipe keeps its parts (recipes/gill.py, minigpt5_stage1.py, minigpt5_stage2.py):

- GILL: on the GPU the LM (frozen, or LoRA; its `[IMG]` rows train), the image input map,
  the retrieval head and the generation mapper (trained) and the decision head (trained in
  its own step after the run). CLIP and Stable Diffusion stay on the host, where they make
  the CLIP embeddings and caption encodings that are the inputs and targets. Each sample
  runs the LM twice: the captioning pass (two captions joined into one sequence when
  `data.concat_captions` > 0) and the image pass.
- MiniGPT-5: on the GPU the LLaVA model (CLIP tower, connector, LM with its voken rows), the
  voken mapper and the frozen UNet, whose latent diffusion loss back-propagates into the
  mapper and the LM. The VAE and the text encoder stay on the host, where they make the
  target latents and caption encodings. Each sample has at most one target image.

Each family builds its `RecipeParts` (`Family.plan_parts`: `mmpeft/gill/plan.py`,
`mmpeft/minigpt5/plan.py`); this module holds the arithmetic. The plan is for the training
steps; the evaluation after them, on the first rank's GPU, is not planned. Parameters
are counted exactly by building each part on the meta device from its config.
Activations are the bytes autograd keeps for backward (d: the training dtype's bytes, s
tokens x b samples, m: a dropout mask's bytes per element, 1 on CUDA). The formulas are in
the docstrings of `lm_layer_bytes`, `lm_activation_bytes`, `logit_bytes`,
`mapper_activation_bytes`, `tower_activation_bytes` and `unet_activation_bytes`; each is
checked against what autograd saves on small models (tests/mmpeft/train/test_plan_parts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmpeft.train.plan import LMSizes, Settings, VisionSizes

MASK_BYTES = 1  # CUDA's dropout keeps a bool mask; the CPU's keeps it in the input's dtype


# ----- the LM ---------------------------------------------------------------------------------

def lm_layer_bytes(lm: LMSizes, seq: int, batch: int, s: Settings, mask_bytes: int = MASK_BYTES) -> int:
    """Bytes one decoder layer keeps for backward at `seq` tokens x `batch` with the LM as
    `s.trainable["llm"]` says (frozen but for token rows, lora or full), per token:

        2 * (4 if norm_upcast else d) * h       two norms' inputs (RMSNorm's in float32)
        + d * (2h + 2kv)                         q, k, v and the attention output (fused kernel)
        + d * (3i if gated else i)               gate, up, act(gate); or the activation's output
        + 2 * m * h                              residual dropout masks, when the LM trains (OPT)
        + sum over LoRA's layers of (d + m) * in its dropped input and mask (d * in without
                                                 dropout: an upper bound, q, k, v read one input)

    A fully trained LM keeps every linear layer's input, `d * in`. Eager attention adds the
    scores and softmax, `2 * d * a * s^2 * b`. A frozen LM keeps no linear input: its weights
    need no gradient, only its inputs do."""
    d, h, llm = s.dtype_bytes, lm.hidden, s.trainable.get("llm", "frozen")
    per_token = 2 * (4 if lm.norm_upcast else d) * h + d * (2 * h + 2 * lm.kv_dim)
    per_token += d * (3 if lm.gated else 1) * lm.intermediate
    if llm != "frozen":
        per_token += 2 * mask_bytes * h if lm.dropout > 0 else 0
        layer = len(lm.linears) // lm.layers
        for (width, _), name in zip(lm.linears[:layer], lm.linear_names[:layer], strict=True):
            if llm == "full" or s.lora_targets == "all-linear" or name in s.lora_targets:
                per_token += (d + mask_bytes) * width if llm == "lora" and s.lora_dropout > 0 else d * width
    scores = 2 * d * lm.heads * seq * seq * batch if s.eager_attention else 0
    return seq * batch * per_token + scores


def lm_activation_bytes(lm: LMSizes, seqs: tuple[int, ...], s: Settings, mask_bytes: int = MASK_BYTES) -> int:
    """Bytes the LM keeps over passes of `seqs` tokens each, `s.micro_batch_size` sequences a
    pass: every layer's (`lm_layer_bytes`) plus the final norm's input; with
    `s.gradient_checkpointing`, each layer's `d * s * b * h` input and, in backward, one
    recomputed layer of the longest pass. A frozen LM with dropout (OPT) runs in eval mode,
    where transformers does not checkpoint (`mmpeft.train.modes`): it keeps every layer's
    bytes."""
    b, d = s.micro_batch_size, s.dtype_bytes
    final_norm = sum(seqs) * b * (4 if lm.norm_upcast else d) * lm.hidden
    if s.gradient_checkpointing and (s.trainable.get("llm", "frozen") != "frozen" or lm.dropout == 0):
        return d * sum(seqs) * b * lm.hidden * lm.layers + final_norm + lm_layer_bytes(lm, max(seqs), b, s, mask_bytes)
    return lm.layers * sum(lm_layer_bytes(lm, seq, b, s, mask_bytes) for seq in seqs) + final_norm


def logit_bytes(lm: LMSizes, seqs: tuple[int, ...], batch: int, dtype_bytes: int) -> int:
    """The loss's float32 log-probabilities, `4 * s * b * vocab`, and what the output head
    keeps because its new token rows train: its input, `d * s * b * h`, and its weight with
    the trained rows merged in (PEFT's trainable tokens), `d * vocab * h`, a new one each pass."""
    return sum(4 * seq * batch * lm.vocab + dtype_bytes * (seq * batch * lm.hidden + lm.vocab * lm.hidden)
               for seq in seqs)


def tower_activation_bytes(vision: VisionSizes, images: int, lm_hidden: int, dtype_bytes: int) -> int:
    """What the CLIP tower keeps for `images` images when gradients flow through it (a
    trained tower; a frozen one keeps nothing, `mmpeft.train.modes`), not checkpointed: per
    image and layer, over its p + 1 tokens, `d * (6 h_v + 2 i_v)` (two LayerNorm inputs, q,
    k, v, attention output, quick GELU's input and sigmoid), its first LayerNorm's input,
    `d * (p + 1) * h_v`, and the connector's GELU input, `d * p * h`; an upper bound under
    checkpointing."""
    tokens = vision.image_tokens + 1
    per_image = tokens * vision.layers * (6 * vision.hidden + 2 * vision.intermediate) + tokens * vision.hidden
    return dtype_bytes * images * (per_image + vision.image_tokens * lm_hidden)


# ----- the voken mapper -------------------------------------------------------------------------

@dataclass(frozen=True)
class MapperSizes:
    """`VokenMapper`'s parameters (`trained` of them train) and shape: `n_vokens` states in,
    `n_query` vectors of `out_dim` out, width `d_model`, feed-forward `ff`."""

    params: int
    trained: int
    llm_hidden: int
    out_dim: int
    n_query: int
    n_vokens: int
    d_model: int
    ff: int
    encoder_layers: int
    decoder_layers: int


def mapper_activation_bytes(m: MapperSizes, runs: int, dtype_bytes: int) -> int:
    """What the mapper keeps for `runs` voken runs (its weights train, so every linear input
    counts). Per run, with D = d_model, F = ff, q queries, n vokens:

        d * ( q * (decoder_layers * (12 D + F) + 2 D + out_dim)   pre-norm decoder: norms, self- and
                                                                  cross-attention, ReLU; final norm, out
            + n * (encoder_layers * (8 D + F) + 2 D + llm_hidden) ) encoder over the voken states, MLP in
    """
    per_run = m.n_query * (m.decoder_layers * (12 * m.d_model + m.ff) + 2 * m.d_model + m.out_dim)
    per_run += m.n_vokens * (m.encoder_layers * (8 * m.d_model + m.ff) + 2 * m.d_model + m.llm_hidden)
    return dtype_bytes * runs * per_run


# ----- Stable Diffusion ---------------------------------------------------------------------------

@dataclass(frozen=True)
class UNetBlock:
    """One block of a UNet's forward pass: `kind` resnet, transformer, downsample, upsample or
    out (the output norm and convolution), at `tokens` latent positions, `width_in` channels
    in, `width` out; a transformer's `depth` blocks of `heads` heads and GEGLU width `ff`,
    its in and out projections convolutions or linear layers."""

    kind: str
    width_in: int
    width: int
    tokens: int
    heads: int = 0
    depth: int = 0
    ff: int = 0
    conv_projection: bool = False


@dataclass(frozen=True)
class DiffusionSizes:
    """A Stable Diffusion model's parameters (UNet, VAE, text encoder), the UNet's blocks in
    forward order, its conditioning (`context` vectors of `width`) and latent side."""

    unet: int
    vae: int
    text_encoder: int
    blocks: tuple[UNetBlock, ...]
    context: int
    width: int
    latent: int


def _transformer(module, tokens: int) -> UNetBlock:
    block = module.transformer_blocks[0]
    return UNetBlock("transformer", module.in_channels, module.in_channels, tokens, block.attn2.heads,
                     len(module.transformer_blocks), block.ff.net[0].proj.out_features // 2,
                     not module.use_linear_projection)


def unet_blocks(unet) -> tuple[UNetBlock, ...]:
    """The blocks of a diffusers `UNet2DConditionModel` (SD 1.x and 2.x layouts) in forward
    order, each at the resolution it runs at."""
    out, tokens = [], unet.config.sample_size ** 2

    def walk(stage, tokens):
        attentions = getattr(stage, "attentions", None) or []
        for k, resnet in enumerate(stage.resnets):
            out.append(UNetBlock("resnet", resnet.in_channels, resnet.out_channels, tokens))
            if k < len(attentions):
                out.append(_transformer(attentions[k], tokens))

    for stage in unet.down_blocks:
        walk(stage, tokens)
        for down in getattr(stage, "downsamplers", None) or []:
            out.append(UNetBlock("downsample", down.channels, down.out_channels, tokens))
            tokens //= 4
    mid = unet.mid_block
    out.append(UNetBlock("resnet", mid.resnets[0].in_channels, mid.resnets[0].out_channels, tokens))
    for attention, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        out += [_transformer(attention, tokens), UNetBlock("resnet", resnet.in_channels, resnet.out_channels, tokens)]
    for stage in unet.up_blocks:
        walk(stage, tokens)
        for up in getattr(stage, "upsamplers", None) or []:
            tokens *= 4
            out.append(UNetBlock("upsample", up.channels, up.out_channels, tokens))
    out.append(UNetBlock("out", unet.conv_out.in_channels, unet.conv_out.in_channels, tokens))
    return tuple(out)


def diffusion_sizes(unet_config: dict, vae_config: dict, text_config) -> DiffusionSizes:
    """The sizes of the Stable Diffusion model whose UNet and VAE configs (diffusers'
    `config.json` as a dict) and text encoder config (a transformers `CLIPTextConfig`) are
    given, each built on the meta device; the conditioning is the text encoder's 77 (its
    positions) x the UNet's `cross_attention_dim`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text = CLIPTextModel(text_config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return DiffusionSizes(count(unet), count(vae), count(text), unet_blocks(unet), text_config.max_position_embeddings,
                          unet.config.cross_attention_dim, unet.config.sample_size)


def unet_block_bytes(block: UNetBlock, context: int, dtype_bytes: int, checkpointing: bool = False,
                     first: bool = False) -> int:
    """Bytes one block keeps for one image; see `unet_activation_bytes`."""
    d, c, n, p = dtype_bytes, block.width, block.tokens, int(block.conv_projection)
    if block.kind == "resnet":
        return d * n * (block.width_in if checkpointing else 3 * (block.width_in + block.width))
    if block.kind in ("downsample", "upsample"):
        return d * n * block.width_in
    if block.kind == "out":
        return 3 * d * n * c
    if checkpointing:
        return d * n * c * (1 + 2 * p + block.depth)
    cross = 3 * c + 3 * block.ff  # from the cross-attention on: its q and output, a norm, GEGLU
    inner = block.depth * (6 * c + cross) if not first else cross + (block.depth - 1) * (6 * c + cross)
    keys = 2 * d * context * c * block.depth  # the cross-attention's keys and values of the conditioning
    return d * n * ((0 if first else c + p * c) + inner + p * c) + keys + 4 * 2 * block.heads * n * block.depth


def unet_activation_bytes(sizes: DiffusionSizes, images: int, dtype_bytes: int, checkpointing: bool) -> int:
    """Bytes the frozen UNet keeps for `images` target images while the diffusion loss
    back-propagates through it into its conditioning (the mapped vokens). Nothing before
    the first cross-attention is kept: neither the noisy latents nor the frozen weights need a
    gradient. From there each block keeps, per latent position, over its channels (C in, C'
    out for a resnet; C for a transformer of T blocks, GEGLU width F, H heads, conditioning
    of K vectors):

        resnet          3 (C + C') d                   two GroupNorm, SiLU and conv inputs each
        transformer     (C + 2 p C) d                  GroupNorm input; proj in and out if convs (p)
                        + T (9 C + 3 F) d              3 LayerNorm inputs, self-attention q, k, v,
                                                       output, cross-attention q, output, GEGLU's
                                                       projection (2F) and GELU output (F)
                        + 8 T H                        float32 softmax statistics, two attentions
                        + 2 T K C d (per image)        the conditioning's keys and values
        down/upsample   C d                            the convolution's input (after upsampling)
        out             3 C d                          GroupNorm, SiLU and conv inputs

    With gradient checkpointing (diffusers checkpoints whenever gradients flow, in eval mode
    too) a resnet keeps its input, C d, and a transformer `(1 + 2p + T) C d`, its GroupNorm
    input and each block's; backward recomputes one block at a time: the largest block's
    bytes are added once. Attention heads count only through the softmax statistics: the
    fused kernels (sdpa, flash) keep no scores."""
    kept, largest = _unet_kept(sizes, dtype_bytes, checkpointing)
    return images * (kept + (largest if checkpointing else 0))


def unet_recompute_bytes(sizes: DiffusionSizes, images: int, dtype_bytes: int) -> int:
    """The largest block's bytes for `images` images: what `unet_activation_bytes` adds under
    checkpointing for the block that backward recomputes."""
    return images * _unet_kept(sizes, dtype_bytes, True)[1]


def _unet_kept(sizes: DiffusionSizes, dtype_bytes: int, checkpointing: bool) -> tuple[int, int]:
    kept = largest = 0
    started = False
    for block in sizes.blocks:
        first = block.kind == "transformer" and not started
        started = started or first
        if started:
            kept += unet_block_bytes(block, sizes.context, dtype_bytes, checkpointing, first)
            largest = max(largest, unet_block_bytes(block, sizes.context, dtype_bytes, False, first))
    return kept, largest


# ----- the recipes ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecipeParts:
    """A GILL or MiniGPT-5 run's parameters besides the LM, vision tower and connector that
    `plan.memory_plan` counts (on the GPU frozen or trained, or `host_only`: kept on the
    host), and what it needs to work out the activations: the LM's `passes` per sample as
    multiples of `data.max_length`, the mapper, the UNet on the GPU (`diffusion`), and the
    images per sample that go through the CLIP tower on the GPU (`tower_images`)."""

    recipe: str
    gpu_frozen: int
    trained: int
    host_only: int
    passes: tuple[int, ...]
    mapper: MapperSizes
    diffusion: DiffusionSizes | None = None
    vision: VisionSizes | None = None
    tower_images: int = 0

    def activations(self, lm: LMSizes, s: Settings, mask_bytes: int = MASK_BYTES) -> dict[str, int]:
        """The activation rows of the plan under settings `s`: the LM's layers, its logits, the
        CLIP tower's (when it trains: a frozen one keeps nothing),
        the mapper's for one voken run a sample, the UNet's for one target image a sample."""
        b, d = s.micro_batch_size, s.dtype_bytes
        seqs = tuple(k * s.max_length for k in self.passes)
        rows = {"LM activations": lm_activation_bytes(lm, seqs, s, mask_bytes), "logits": logit_bytes(lm, seqs, b, d)}
        if self.tower_images and s.trainable.get("vision", "frozen") != "frozen":
            rows["vision activations"] = tower_activation_bytes(self.vision, self.tower_images * b, lm.hidden, d)
        rows["mapper activations"] = mapper_activation_bytes(self.mapper, b, d)
        if self.diffusion:
            rows["UNet activations"] = unet_activation_bytes(self.diffusion, b, d, s.gradient_checkpointing)
        return rows


def describe_parts(parts: RecipeParts, lm: LMSizes, vision: VisionSizes, connector: int, s: Settings) -> str:
    """The line `mmpeft plan` prints above the plan: each part's parameters and where it is."""
    how = {part: s.trainable.get(part, "frozen") for part in ("vision", "connector", "llm")}
    m, rows = parts.mapper, f"{s.new_token_rows} new token rows train"
    if how["llm"] == "frozen" and s.gradient_checkpointing and lm.dropout > 0:
        rows += "; in eval mode, so not checkpointed"
    out = [f"LM {lm.params:,} ({how['llm']}; {rows})"]
    if parts.diffusion is None:  # GILL: CLIP and Stable Diffusion on the host
        out.append(f"heads and mapper {parts.trained + parts.gpu_frozen:,} ({parts.trained:,} trained)")
        lm_passes = " + ".join(f"{k} x {s.max_length}" for k in parts.passes)
        out.append(f"on the host CLIP and Stable Diffusion {parts.host_only:,}; LM passes a sample: {lm_passes} tokens")
    else:
        sd = parts.diffusion
        out += [f"vision {vision.params:,} ({how['vision']})", f"connector {connector:,} ({how['connector']})",
                f"mapper {m.params:,} ({m.trained:,} trained)", f"UNet {sd.unet:,} (frozen)",
                f"on the host VAE and text encoder {parts.host_only:,}; a sample: {parts.tower_images} image(s) "
                f"of {vision.image_tokens} tokens through the tower, 1 target image ({sd.latent} x {sd.latent} "
                "latents)"]
    return "parts: " + ", ".join(out)
