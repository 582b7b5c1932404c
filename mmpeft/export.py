"""Merge a run's LoRA into its base and write a standalone checkpoint.

    LLaVA     a transformers-native `LlavaForConditionalGeneration` folder with its
              `LlavaProcessor`: transformers' image-text-to-text pipeline and servers that
              read that format load it with no mmpeft code
    MiniGPT-5 the same native folder for its LM part (the voken rows merged into the
              vocabulary) plus `mapper.safetensors` and `mmpeft_config.json`
    GILL      the merged LM as a plain causal-LM folder (the `[IMG]` rows merged), the
              tokenizer, `gill_heads.safetensors` and `mmpeft_config.json`
    General-GPT likewise, with `general_gpt.safetensors` (Flamingo trains no LM weights, so
              its run folder is already standalone apart from the bases)

A QLoRA run is merged into the base loaded in full precision (its LoRA was trained on
that base's 4-bit copy), so the export is never quantized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel

from .models.llava_io import CONFIG_FILE


def _merged(model):
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def native_llava(model):
    """A `LlavaForConditionalGeneration` built from its own config, holding the weights of
    mmpeft's assembled (and merged) LLaVA: the vision tower, the two-layer projector, the
    LM and its head."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if getattr(model.config, "mmpeft_connector", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"transformers' LLaVA has a two-layer projector; a '{model.config.mmpeft_connector}' "
                         "connector has no native export (train with model.connector=mlp2x_gelu)")
    config = LlavaConfig.from_dict({k: v for k, v in model.config.to_dict().items() if k != "mmpeft_connector"})
    native = LlavaForConditionalGeneration(config).to(next(model.parameters()).dtype)
    tower = native.model.vision_tower  # older transformers nest the transformer in `.vision_model`
    getattr(tower, "vision_model", tower).load_state_dict(model.model.vision_tower.state_dict())
    native.model.multi_modal_projector.load_state_dict(model.model.multi_modal_projector.state_dict())
    native.model.language_model.load_state_dict(model.model.language_model.state_dict())
    native.lm_head.load_state_dict(model.lm_head.state_dict())
    native.generation_config = model.generation_config
    return native.eval()


def export_run(folder: str | Path, out: str | Path, lm: str | None = None, clip: str | None = None) -> Path:
    """Write the standalone checkpoint of the run in `folder` (see above) to `out`, which
    must not exist yet; returns `out`."""
    from .loading import Loaded, load

    folder, out = Path(folder), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; export writes a new folder")
    settings = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
    recipe = settings.get("recipe", "")
    loaded: Loaded
    if recipe.startswith(("llava_", "minigpt5_")):
        from .models.llava_io import load_llava

        # full precision even for a QLoRA run: an explicit (empty) quantization config wins
        model, processor, settings = load_llava(folder, lm, clip, quantization_config=None)
        with torch.no_grad():
            native = native_llava(_merged(model))
        native.save_pretrained(out)
        processor.save_pretrained(out)
        if recipe.startswith("minigpt5_"):
            shutil.copy(folder / "mapper.safetensors", out / "mapper.safetensors")
    elif recipe == "gill":
        loaded = load(folder, lm=lm)
        gill = loaded.model
        _merged(gill.lm).save_pretrained(out)
        loaded.processor.save_pretrained(out)
        shutil.copy(folder / "gill_heads.safetensors", out / "gill_heads.safetensors")
    elif recipe == "general_gpt":
        loaded = load(folder, lm=lm)
        _merged(loaded.model.lm).save_pretrained(out)
        loaded.processor.save_pretrained(out)
        shutil.copy(folder / "general_gpt.safetensors", out / "general_gpt.safetensors")
    elif recipe == "flamingo":
        raise ValueError(f"{folder}: a Flamingo run leaves the LM as it was, so there is nothing to merge; "
                         "share the run folder itself (mmpeft push) and load it with mmpeft.load")
    else:
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE} naming an mmpeft recipe: nothing to export")
    exported = {**settings, "exported_from": str(folder), "merged": True}
    (out / CONFIG_FILE).write_text(json.dumps(exported, indent=1, sort_keys=True) + "\n")
    return out
