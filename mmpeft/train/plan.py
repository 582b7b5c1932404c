"""A per-GPU memory plan for a LoRA / QLoRA run, worked out before any weights load.

Sizes come from the models' configs alone (`lm_sizes`, `vision_sizes` build the model on
the meta device, which allocates nothing); the plan itself (`memory_plan`) is arithmetic on
plain numbers. Bytes are split as a run spends them:

- weights: the training dtype's bytes per parameter; under `qlora` the LM's linear layers
  take 4-bit NF4, 0.5 byte per parameter plus bitsandbytes' double-quantised constants (an
  8-bit absmax per 64 weights and a float32 per 256 of those), while the head, embeddings,
  norms, connector and vision tower stay in the training dtype. ZeRO-3 shards them over
  the GPUs and gathers a layer at a time (two layers counted, for the prefetch); offloaded
  parameters live on the host.
- trainable parameters: LoRA's `r * (in + out)` per targeted linear layer, fully trained
  parts, and new token rows; their 16-bit gradients (sharded from ZeRO-2) and AdamW's
  states, 12 bytes per parameter under mixed precision (float32 master copy and two
  moments; 8 in float32 training), sharded from ZeRO-1; offloaded optimizer states and
  their float32 gradients (16 bytes per parameter) live on the host.
- activations: see `activation_bytes`; the loss's float32 log-probabilities,
  `4 * s * b * vocab`.
- a fixed reserve for the CUDA context and allocator slack (`RESERVE_GIB`).
- host memory per rank while loading: every part whole, except a LLaVA LM under ZeRO-3
  (not quantized), which loads partitioned (`mmpeft.train.placement`): its 1/N, and its
  embeddings whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

GIB = 1024**3
RESERVE_GIB = 1.5
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights, 8-bit absmax per 64, float32 per 256 absmaxes


@dataclass(frozen=True)
class LMSizes:
    """A causal LM's shape and parameter counts. `linears`: (in, out) of every linear layer
    of the decoder (the head excluded), `linear_names` their last name components. `gated`:
    its MLP has two linear layers into the intermediate width (SwiGLU's gate and up);
    `norm_upcast`: its norms compute in float32 (RMSNorm; LayerNorm does not); `dropout`:
    its residual dropout while it trains (OPT's 0.1)."""

    params: int
    hidden: int
    layers: int
    heads: int
    kv_dim: int
    intermediate: int
    vocab: int
    linears: tuple[tuple[int, int], ...]
    linear_names: tuple[str, ...]
    tied: bool
    gated: bool = True
    norm_upcast: bool = True
    dropout: float = 0.0

    @property
    def linear_params(self) -> int:
        return sum(i * o for i, o in self.linears)


@dataclass(frozen=True)
class VisionSizes:
    """A vision tower's parameter count, width and image tokens (`(image_size / patch) ** 2`),
    its depth and MLP width."""

    params: int
    hidden: int
    image_tokens: int
    layers: int = 0
    intermediate: int = 0


@dataclass(frozen=True)
class Settings:
    """What a run chooses. `trainable` maps `vision`, `connector`, `llm` to frozen, full or
    lora; `lora_targets` is "all-linear" or a list of layer names; `dtype_bytes` 2 for
    bf16/fp16, 4 for float32; `zero_stage` 0-3."""

    gpus: int
    micro_batch_size: int
    grad_accum: int
    max_length: int
    gradient_checkpointing: bool
    dtype_bytes: int
    zero_stage: int
    offload_param: bool
    offload_optimizer: bool
    qlora: bool
    lora_r: int
    lora_dropout: float
    lora_targets: str | tuple[str, ...]
    trainable: dict
    new_token_rows: int = 0
    eager_attention: bool = False


def lm_sizes(config) -> LMSizes:
    """The sizes of the causal LM that `config` (a transformers config) describes, counted
    exactly by building it on the meta device."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = [(n.rsplit(".", 1)[-1], m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and m is not head]
    text = config.get_text_config()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = getattr(text, "intermediate_size", None) or text.ffn_dim
    into_mlp = sum(m.out_features == intermediate for _, m in linears) // text.num_hidden_layers
    return LMSizes(
        params=sum(p.numel() for p in model.parameters()), hidden=hidden, layers=text.num_hidden_layers, heads=heads,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=intermediate, vocab=text.vocab_size,
        linears=tuple((m.in_features, m.out_features) for _, m in linears), linear_names=tuple(n for n, _ in linears),
        tied=head is not None and head.weight is model.get_input_embeddings().weight, gated=into_mlp >= 2,
        norm_upcast=not any(isinstance(m, nn.LayerNorm) for m in model.modules()),
        dropout=float(getattr(text, "dropout", 0.0) or 0.0))


def vision_sizes(config) -> VisionSizes:
    """The sizes of the CLIP vision tower in `config` (a CLIPConfig or CLIPVisionConfig)."""
    import torch
    from transformers import CLIPVisionModel

    vision = getattr(config, "vision_config", config)
    with torch.device("meta"):
        tower = CLIPVisionModel(vision)
    return VisionSizes(sum(p.numel() for p in tower.parameters()), vision.hidden_size,
                       (vision.image_size // vision.patch_size) ** 2, vision.num_hidden_layers,
                       vision.intermediate_size)


def connector_params(connector: str, vision_hidden: int, text_hidden: int) -> int:
    """Parameters of LLaVA's `linear` or `mlp2x_gelu` connector (weights and biases)."""
    if connector == "linear":
        return vision_hidden * text_hidden + text_hidden
    if connector == "mlp2x_gelu":
        return vision_hidden * text_hidden + text_hidden + text_hidden * text_hidden + text_hidden
    raise ValueError(f"model.connector {connector!r}: the plan counts linear and mlp2x_gelu only")


def lora_params(lm: LMSizes, r: int, targets: str | tuple[str, ...] = "all-linear") -> int:
    """LoRA's A and B over the targeted linear layers: `r * (in + out)` each."""
    return sum(r * (i + o) for (i, o), name in zip(lm.linears, lm.linear_names, strict=True)
               if targets == "all-linear" or name in targets)


def activation_bytes(lm: LMSizes, seq: int, batch: int, dtype_bytes: int = 2, lora_dropout: float = 0.0,
                     eager_attention: bool = False) -> int:
    """Bytes one decoder layer keeps for backward at `seq` tokens x `batch`, without
    checkpointing. Korthikanti et al. 2022 ("Reducing Activation Recomputation") give
    `s*b*h*(34 + 5*a*s/h)` for a GPT layer in 16-bit; counted the same way for a Llama layer
    (RMSNorm, SwiGLU MLP of width i, fused attention) with LoRA on its linear layers, with
    d = `dtype_bytes`, kv the key/value width and r-wide LoRA outputs neglected:

        s*b * ( 2 * 4h                      two RMSNorms, upcast to float32
              + d * (2h + 2kv)              q, k after rotary, v, attention output
              + d * 3i                      gate, up, SiLU(gate)
              + d * (h + h + h + i) )       linear inputs kept for LoRA: qkv, o, gate/up, down

    With LoRA dropout each targeted layer keeps its own dropped input and a 1-byte mask
    instead of the shared input: `(d + 1) * (4h + 2h + i)` in place of the last line.
    Eager attention adds the scores and softmax, `2 * d * a * s^2 * b` (Korthikanti's
    5as/h term less the dropout mask); fused kernels (sdpa, flash) keep only the output.
    """
    h, i, kv = lm.hidden, lm.intermediate, lm.kv_dim
    kept = (dtype_bytes + 1) * (6 * h + i) if lora_dropout > 0 else dtype_bytes * (3 * h + i)
    per_token = 8 * h + dtype_bytes * (2 * h + 2 * kv) + dtype_bytes * 3 * i + kept
    scores = 2 * dtype_bytes * lm.heads * seq * seq * batch if eager_attention else 0
    return seq * batch * per_token + scores


@dataclass(frozen=True)
class Plan:
    """Bytes per GPU and per host rank, by what holds them, and whether the GPU total fits."""

    settings: Settings
    total_params: int
    trainable_params: int
    gpu: dict
    host: dict
    fits: bool
    gpu_memory_gib: float

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())


def memory_plan(lm: LMSizes, vision: VisionSizes, connector: int, s: Settings, gpu_memory_gib: float,
                parts=None) -> Plan:
    """The per-GPU and per-rank host memory of a LLaVA-style run (vision tower, connector,
    LM) under settings `s`, and whether it fits in `gpu_memory_gib` per GPU. `parts`: what a
    GILL or MiniGPT-5 run holds besides (`plan_parts.RecipeParts`: its parameters on the GPU,
    trained or frozen, those kept on the host, and its activations in place of LLaVA's)."""
    d, n = s.dtype_bytes, s.gpus
    choice = {part: s.trainable.get(part, "frozen") for part in ("vision", "connector", "llm")}
    lm_linear = lm.linear_params
    beside = parts.gpu_frozen + parts.trained if parts else 0
    rest = lm.params - lm_linear + vision.params + connector + beside
    frozen_weights = lm_linear * (NF4_BYTES if s.qlora else d) + rest * d
    added = s.new_token_rows * lm.hidden * (1 if lm.tied else 2)
    added += lora_params(lm, s.lora_r, s.lora_targets) if choice["llm"] == "lora" else 0
    full = {"llm": lm.params, "vision": vision.params, "connector": connector}
    trainable = added + sum(n for part, n in full.items() if choice[part] == "full") + (parts.trained if parts else 0)
    weights = frozen_weights + added * d  # LoRA and token rows sit beside the base weights
    stage3 = s.zero_stage >= 3
    largest_layer = max(lm.linear_params // lm.layers * (NF4_BYTES if s.qlora else d), 1)
    gathered = 2 * largest_layer if stage3 else 0
    optimizer_per_param = 12 if d == 2 else 8
    grads = trainable * d / (n if s.zero_stage >= 2 else 1)
    optimizer = trainable * optimizer_per_param / (n if s.zero_stage >= 1 else 1)
    if parts:
        activations = parts.activations(lm, s)
    else:
        layer = activation_bytes(lm, s.max_length, s.micro_batch_size, d, s.lora_dropout, s.eager_attention)
        if s.gradient_checkpointing:
            kept = 2 * s.max_length * s.micro_batch_size * lm.hidden * lm.layers + layer
        else:
            kept = layer * lm.layers
        activations = {"activations": kept, "logits": 4 * s.max_length * s.micro_batch_size * lm.vocab}
    weights_gpu = (0 if s.offload_param else weights / n) + gathered if stage3 else weights
    gpu = {"weights": weights_gpu, "gradients": grads, "optimizer": 0 if s.offload_optimizer else optimizer,
           **activations, "reserve": RESERVE_GIB * GIB}
    on_host = parts.host_only if parts else 0
    loaded = lm.params + vision.params + connector + beside + on_host
    lm_held = lm.params
    if stage3 and not s.qlora and parts is None:  # the LLaVA recipes load a ZeRO-3 LM partitioned
        embeddings = lm.vocab * lm.hidden * (1 if lm.tied else 2)  # rebuilt whole when the image token is added
        lm_held = (lm.params - embeddings) / n + embeddings
    host = {"loading": (loaded - lm.params + lm_held) * d, **({"kept on the host": on_host * d} if parts else {}),
            "offloaded weights": weights / n if stage3 and s.offload_param else 0,
            "offloaded optimizer": trainable * (optimizer_per_param + 4) / n if s.offload_optimizer else 0}
    gpu = {k: int(v) for k, v in gpu.items()}
    total = sum(gpu.values())
    return Plan(s, loaded, int(trainable), gpu, {k: int(v) for k, v in host.items()},
                total <= gpu_memory_gib * GIB, gpu_memory_gib)


# the settings a plan may suggest, as recipe overrides beside the changed Settings fields
REMEDIES = (
    ("training.gradient_checkpointing=true", {"gradient_checkpointing": True}),
    ("training.ds_config=ds_configs/zero3.json", {"zero_stage": 3}),
    ("model.qlora=true", {"qlora": True}),
    ("training.ds_config=ds_configs/zero3_offload.json",
     {"zero_stage": 3, "offload_param": True, "offload_optimizer": True}),
)


def suggestions(lm: LMSizes, vision: VisionSizes, connector: int, s: Settings, gpu_memory_gib: float,
                parts=None) -> list[Plan]:
    """Settings near `s` that fit: for each remedy not already in `s` (checkpointing, ZeRO-3,
    QLoRA, ZeRO-3 with offload), alone and after it the largest micro batch that fits, the
    gradient accumulation raised to keep the global batch. Returns the fitting plans, each
    `settings` changed accordingly; see `overrides` for the settings as recipe overrides.
    `parts` as in `memory_plan`."""
    out = []
    for _, change in ((None, {}), *REMEDIES):
        if change and all(getattr(s, k) == v for k, v in change.items()):
            continue
        batch = s.micro_batch_size
        while batch >= 1:
            accum = max(1, s.grad_accum * s.micro_batch_size // batch)
            plan = memory_plan(lm, vision, connector, replace(s, micro_batch_size=batch, grad_accum=accum, **change),
                               gpu_memory_gib, parts)
            if plan.fits:
                if plan.settings != s:
                    out.append(plan)
                break
            batch //= 2
    return out


def overrides(before: Settings, after: Settings) -> list[str]:
    """`after`'s differences from `before` as recipe overrides (`training.x=y`)."""
    out = [text for text, change in REMEDIES
           if change and all(getattr(after, k) == v for k, v in change.items())
           and not all(getattr(before, k) == v for k, v in change.items())]
    if any("zero3_offload" in o for o in out):
        out = [o for o in out if o != "training.ds_config=ds_configs/zero3.json"]
    if after.micro_batch_size != before.micro_batch_size:
        out += [f"training.micro_batch_size={after.micro_batch_size}", f"training.grad_accum={after.grad_accum}"]
    return out


def steps_per_epoch(samples: int, s: Settings) -> int:
    """Optimizer steps for one pass over `samples` at the global batch of `s`."""
    return math.ceil(samples / (s.micro_batch_size * s.grad_accum * s.gpus))


def describe(plan: Plan, samples: int | None = None) -> str:
    """The plan as the lines `mmpeft plan` prints."""
    s = plan.settings
    gib = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    lines = [f"{plan.total_params:,} parameters, {plan.trainable_params:,} trainable; {s.gpus} GPU(s), "
             f"ZeRO-{s.zero_stage}"
             + (" with offload" if s.offload_param or s.offload_optimizer else "")
             + f", {'qlora' if s.qlora else f'{8 * s.dtype_bytes}-bit weights'}, micro batch {s.micro_batch_size} x "
             f"{s.max_length} tokens, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}",
             "per GPU:"]
    lines += [f"  {name:<22}{gib(value)}" for name, value in plan.gpu.items()]
    lines += [f"  {'total':<22}{gib(plan.gpu_total)}", "host, per rank:"]
    lines += [f"  {name:<22}{gib(value)}" for name, value in plan.host.items()]
    if samples:
        lines.append(f"steps per epoch: {steps_per_epoch(samples, s):,} ({samples:,} samples, global batch "
                     f"{s.micro_batch_size * s.grad_accum * s.gpus})")
    verdict = "fits" if plan.fits else "does not fit"
    lines.append(f"verdict: {verdict} in {plan.gpu_memory_gib:g} GiB per GPU ({plan.gpu_total / GIB:.1f} GiB planned)")
    return "\n".join(lines)
