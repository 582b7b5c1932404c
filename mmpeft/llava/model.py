"""LLaVA assembled from parts: a CLIP vision tower, a connector and any causal LM, as a
transformers-native `LlavaForConditionalGeneration`.

The parts are moved in as they were loaded (quantized or not), never copied: the shell is
built on the meta device and its three parts replaced by the loaded modules.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mmpeft.models.tokens import add_tokens

IMAGE_TOKEN = "<image>"
CONNECTORS = ("linear", "mlp2x_gelu", "qformer", "perceiver_resampler")


class LinearProjector(nn.Module):
    """LLaVA-1's connector: one linear map from vision width to LM width."""

    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)


def add_image_token(tokenizer, lm, image_token: str = IMAGE_TOKEN) -> int:
    """Add the image placeholder token (see `add_tokens`) and return its id."""
    return add_tokens(tokenizer, lm, [image_token])[0]


def build_llava(vision_tower: nn.Module, lm, image_token_id: int, connector: str = "mlp2x_gelu",
                vision_feature_layer: int = -2, connector_options: dict | None = None) -> LlavaForConditionalGeneration:
    """A `LlavaForConditionalGeneration` around an existing CLIP vision tower (a
    `CLIPVisionModel`) and causal LM; only the connector is new (seeded by the caller).

    Features come from `vision_feature_layer` with the class token dropped, as in LLaVA.
    `linear` and `mlp2x_gelu` give one LM token per patch; `qformer` and
    `perceiver_resampler` a fixed number, set with the rest of their `connector_options`
    (see `mmpeft.models.connectors`).
    """
    from mmpeft.models.connectors import RESAMPLING

    if connector not in CONNECTORS:
        raise ValueError(f"connector must be one of {CONNECTORS}, not '{connector}'")
    if connector_options and connector not in RESAMPLING:
        raise ValueError(f"connector {connector} takes no options (got {sorted(connector_options)})")
    vcfg = vision_tower.config
    resampler = RESAMPLING[connector](vcfg.hidden_size, lm.config.hidden_size, connector_options) \
        if connector in RESAMPLING else None
    config = LlavaConfig(
        vision_config=vcfg.to_dict(), text_config=lm.config.to_dict(), image_token_index=image_token_id,
        image_seq_length=resampler.tokens if resampler else (vcfg.image_size // vcfg.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
        tie_word_embeddings=getattr(lm.config, "tie_word_embeddings", False),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_tower
    model.model.language_model = lm.base_model
    model.lm_head = lm.get_output_embeddings()
    # the vision tower is never quantized, so its dtype is the one the connector should have
    dtype = next(vision_tower.parameters()).dtype
    model.model.multi_modal_projector = (
        resampler if resampler is not None
        else LlavaMultiModalProjector(config) if connector == "mlp2x_gelu"
        else LinearProjector(vcfg.hidden_size, lm.config.hidden_size)
    ).to(dtype=dtype)
    model.config.mmpeft_connector = connector
    model.config.mmpeft_connector_options = dict(connector_options or {})
    return model


def llava_processor(image_processor, tokenizer, vision_config, image_token: str = IMAGE_TOKEN,
                    image_tokens: int | None = None) -> LlavaProcessor:
    """The `LlavaProcessor` that inference and export use (it expands `<image>` itself).
    `image_tokens`: the connector's fixed token count (`qformer`, `perceiver_resampler`);
    CLIP's processor gives every image the tower's size, so the processor's count of
    patches plus its `num_additional_image_tokens` is set to come out at that number."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    extra = 1 if image_tokens is None else image_tokens - patches + 1  # "default" drops one (the class token)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
                          vision_feature_select_strategy="default", image_token=image_token,
                          num_additional_image_tokens=extra)


def nf4_config(dtype: torch.dtype, skip_modules: list[str] | None = None):
    """QLoRA's 4-bit NF4 quantization (double quantization, compute in `dtype`).
    `skip_modules`: module names kept out of it; without them transformers keeps out the
    output head."""
    from transformers import BitsAndBytesConfig

    # storage in the compute dtype lets ZeRO-3 shard the 4-bit weights like any other tensor
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
                              llm_int8_skip_modules=skip_modules)


def qlora_device_map(env=None, cuda: bool | None = None) -> dict | None:
    """Where a 4-bit LM loads: on this rank's own GPU (`LOCAL_RANK`, which the launcher
    sets), since bitsandbytes quantizes while loading and, left alone, every rank would put
    its copy on GPU 0. None without a GPU (the CPU backend)."""
    from mmpeft.train.placement import rank_device

    device = rank_device(env, cuda)
    return {"": device.index} if device.type == "cuda" else None


def load_base_models(preset, qlora: bool = False, dtype: torch.dtype = torch.float32, log=print,
                     attn_implementation: str | None = "sdpa", zero3: dict | None = None):
    """From a resolved preset: the causal LM (4-bit NF4 when `qlora`, on this rank's GPU;
    its head and the vision tower stay unquantized), its tokenizer, the CLIP vision tower
    and CLIP's image processor. `attn_implementation`: the LM's attention kernel (`sdpa`,
    `flash_attention_2` when flash-attn is installed, `eager`). `log` gets the loaders'
    notes (a base read from `.bin` weights). No k-bit preparation casts weights to float32:
    DeepSpeed's bf16 engine holds them in bf16 (the trained ones with float32 masters), and
    checkpointing is `training.gradient_checkpointing`. `zero3`: a ZeRO-3 DeepSpeed config
    (`mmpeft.train.placement.zero3_loading_config`), to load the LM partitioned over the
    ranks; the vision tower loads whole, as the feature cache runs it on one rank."""
    from mmpeft.presets import load_clip, load_lm
    from mmpeft.train.placement import partitioned_loading

    quantized = {"quantization_config": nf4_config(dtype), "device_map": qlora_device_map()} if qlora else {}
    with partitioned_loading(zero3):
        lm, tokenizer = load_lm(preset, log=log, dtype=dtype, attn_implementation=attn_implementation, **quantized)
    if zero3:
        import torch.distributed as dist

        log(f"LM: loaded partitioned over {dist.get_world_size()} rank(s) (ZeRO-3), each holding its shard")
    ensure_pad_token(tokenizer)
    clip, processor = load_clip(preset, log=log, dtype=dtype)
    return lm, tokenizer, clip.vision_model, processor.image_processor


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token (Vicuna's) `<unk>` as one, as LLaVA's training
    does, else its EOS token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token


def unwrap(model) -> nn.Module:
    """The `LlavaForConditionalGeneration` inside a DeepSpeed engine and/or a `PeftModel`."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def llava_forward(model, batch: dict):
    """The model's output for a collated batch. A batch may carry `image_features`
    (cached vision tower output, see `VisionFeatureCache`) in place of `pixel_values`:
    they go through the connector here and into the model as its encoder outputs."""
    if batch.get("image_features") is None:
        return model(**batch)
    rest = {k: v for k, v in batch.items() if k != "image_features"}
    connector = unwrap(model).model.multi_modal_projector
    projected = connector(batch["image_features"].to(next(connector.parameters()).dtype))
    return model(**rest, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=tuple(projected))})


def llava_parts(model) -> dict[str, nn.Module]:
    """The parts whose trainability a recipe sets."""
    parts = {"vision": model.model.vision_tower, "connector": model.model.multi_modal_projector,
             "llm": model.model.language_model}
    if hasattr(model.model.multi_modal_projector, "projection"):  # MiniGPT-4 trains only this linear map
        parts["projection"] = model.model.multi_modal_projector.projection
    return parts
