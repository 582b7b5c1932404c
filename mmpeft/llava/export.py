"""LLaVA's standalone export: a transformers-native `LlavaForConditionalGeneration` folder
with its `LlavaProcessor`, which transformers' image-text-to-text pipeline and servers that
read that format load with no mmpeft code."""

from __future__ import annotations

from pathlib import Path

import torch

from mmpeft.export import merged


def native_llava(model):
    """A `LlavaForConditionalGeneration` built from its own config, holding the weights of
    mmpeft's assembled (and merged) LLaVA: the vision tower, the two-layer projector, the
    LM and its head, all in the LM's dtype (Vicuna's float16: a 7B export is built at
    13.5 GB, never as a 27 GB float32 copy)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if getattr(model.config, "mmpeft_connector", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"transformers' LLaVA has a two-layer projector; a '{model.config.mmpeft_connector}' "
                         "connector has no native export (train with model.connector=mlp2x_gelu)")
    config = LlavaConfig.from_dict({k: v for k, v in model.config.to_dict().items() if k != "mmpeft_connector"})
    dtype = next(model.model.language_model.parameters()).dtype
    native = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    tower = native.model.vision_tower  # older transformers nest the transformer in `.vision_model`
    getattr(tower, "vision_model", tower).load_state_dict(model.model.vision_tower.state_dict())
    native.model.multi_modal_projector.load_state_dict(model.model.multi_modal_projector.state_dict())
    native.model.language_model.load_state_dict(model.model.language_model.state_dict())
    native.lm_head.load_state_dict(model.lm_head.state_dict())
    native.generation_config = model.generation_config
    return native.eval()


def export_llava(folder: str | Path, out: str | Path, lm: str | None = None, clip: str | None = None) -> dict:
    """Write the native folder of the LLaVA-shaped run in `folder` to `out`; returns the
    run's settings. A QLoRA run is merged into the base loaded in full precision (its LoRA
    was trained on that base's 4-bit copy), so the export is never quantized."""
    from mmpeft.llava.checkpoint import load_llava

    # full precision even for a QLoRA run: an explicit (empty) quantization config wins
    model, processor, settings = load_llava(folder, lm, clip, quantization_config=None)
    with torch.no_grad():
        native = native_llava(merged(model))
    native.save_pretrained(out)
    # the processor and its tokenizer both write chat_template.jinja: give them the same one
    processor.chat_template = processor.tokenizer.chat_template = inference_template(folder, settings,
                                                                                      processor.tokenizer)
    processor.save_pretrained(out)
    return settings


def inference_template(folder: str | Path, settings: dict, tokenizer) -> str:
    """The chat template for the conversation format the run in `folder` trained with (its
    settings' `config.data.conversation_format`), taking typed content as well as strings
    (see `mmpeft.llava.chat_templates`)."""
    from mmpeft.families import CONFIG_FILE
    from mmpeft.llava.chat_templates import export_chat_template

    conversation_format = settings.get("config", {}).get("data", {}).get("conversation_format")
    if conversation_format is None:
        raise ValueError(f"{Path(folder) / CONFIG_FILE} has no config.data.conversation_format: the export "
                         "cannot tell which chat template the run was trained with")
    return export_chat_template(conversation_format, tokenizer.chat_template)
