"""What a LLaVA run writes to each checkpoint and to its output folder, and the one call
that loads any of them back.

    mmpeft_config.json            sources of the base models and every setting needed to rebuild
    connector.safetensors         the connector's weights
    llava_adapter/                PEFT adapter on the whole LLaVA model (when any part is LoRA)
    adapter_config.json,          the same LoRA weights for the LM alone, in the LM's own module
    adapter_model.safetensors     names: `PeftModel.from_pretrained(base_lm, folder)` loads them
                                  (not for a run from a released LLaVA, `init_from`: it has no LM
                                  alone; `llava_adapter/` loads with plain PEFT onto that checkpoint)
    lm/                           the LM's weights, when the LM was fully fine-tuned
    processor files               `LlavaProcessor` (tokenizer with `<image>`, image processor)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from mmpeft.families import CONFIG_FILE


def _lm_view(peft_model, lm_prefix: str, base_prefix: str) -> tuple[dict, list[str]]:
    """LoRA tensors of the LM renamed from LLaVA's module names to the LM's own."""
    state = get_peft_model_state_dict(peft_model)
    inside = f"base_model.model.{lm_prefix}."
    renamed = {f"base_model.model.{base_prefix}." + k[len(inside):]: v.detach().cpu().contiguous()
               for k, v in state.items() if k.startswith(inside) and "lora_" in k}
    targets = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in renamed})
    return renamed, targets


def connector_state(projector) -> dict:
    """The connector's tensors under its own names, also where PEFT wraps it or a part of it
    (`modules_to_save`): the trained copy, never the original beside it."""
    state = {}
    for k, v in projector.state_dict().items():
        if k.startswith("original_module.") or ".original_module." in k:
            continue
        k = re.sub(r"(^|\.)modules_to_save\.default\.", r"\1", k)
        state[k] = v.detach().cpu().contiguous()
    return state


def save_llava(model, folder: str | Path, processor, settings: dict) -> None:
    """Write the files above for `model` (a `LlavaForConditionalGeneration`, PEFT-wrapped
    or not). `settings` must hold `sources` and what `load_llava` needs to rebuild."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    is_peft = isinstance(model, PeftModel)
    llava = model.base_model.model if is_peft else model
    save_file(connector_state(llava.model.multi_modal_projector), folder / "connector.safetensors")
    if is_peft:
        # new token rows are rebuilt at load (mean of the old); trained ones travel as PEFT trainable tokens
        model.save_pretrained(folder / "llava_adapter", save_embedding_layers=False)
        lora = model.peft_config["default"]
        base_prefix = settings.get("lm_base_prefix", "model")
        tensors, targets = _lm_view(model, "model.language_model", base_prefix)
        if tensors and "lm" in settings["sources"]:
            save_file(tensors, folder / "adapter_model.safetensors")
            LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, target_modules=targets,
                       task_type="CAUSAL_LM", base_model_name_or_path=settings["sources"]["lm"]).save_pretrained(folder)
    if settings.get("trainable", {}).get("llm") == "full":
        llava.model.language_model.save_pretrained(folder / "lm")
    processor.save_pretrained(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def trained_dtype(settings: dict):
    """The dtype a run trained in (bf16, fp16 or fp32)."""
    from mmpeft.train.loop import training_dtype

    return training_dtype(settings.get("config", {}).get("training", {}))


def quantized_like(settings: dict, load_kwargs: dict, skip_modules: list[str] | None = None) -> dict:
    """`load_kwargs` for the LM, with the 4-bit NF4 config it trained on when the run was
    QLoRA (unless the caller gives its own); `skip_modules` as it was kept out of 4 bits."""
    if not settings.get("qlora") or "quantization_config" in load_kwargs:
        return load_kwargs
    from mmpeft.llava.model import nf4_config

    dtype = trained_dtype(settings)
    return {"dtype": dtype, **load_kwargs, "quantization_config": nf4_config(dtype, skip_modules)}


def lm_load_kwargs(settings: dict, load_kwargs: dict, dtype) -> tuple[dict, object]:
    """`quantized_like(settings, load_kwargs)` with `dtype` wherever neither the caller nor a
    QLoRA run (its compute dtype) names one, and the dtype the run's other parts must then
    load in to match the LM."""
    kwargs = quantized_like(settings, dict(load_kwargs))
    kwargs.setdefault("dtype", dtype)
    return kwargs, kwargs["dtype"]


def _released_base(settings: dict, lm_source: str | None, clip_source: str | None, base_kwargs: dict,
                   load_kwargs: dict):
    """The released LLaVA a run started from (`init_from`), or a local copy of it."""
    from mmpeft.llava.released import UNQUANTIZED, load_released_llava

    copies = {s for s in (lm_source, clip_source) if s}
    if len(copies) > 1:
        raise ValueError(f"this run started from one LLaVA checkpoint ({settings['sources']['llava']}); give its "
                         f"local copy once (lm= or clip=), not {sorted(copies)}")
    load_kwargs = {"dtype": trained_dtype(settings), **quantized_like(settings, load_kwargs, UNQUANTIZED)}
    model, _ = load_released_llava(copies.pop() if copies else settings["sources"]["llava"],
                                   **base_kwargs, **load_kwargs)
    return model


def load_llava(folder: str | Path, lm_source: str | None = None, clip_source: str | None = None,
               base_kwargs: dict | None = None, **load_kwargs):
    """Rebuild a trained LLaVA from a checkpoint or output folder in one call; returns
    `(model, processor, settings)`. The base models come from the sources recorded at
    training time unless `lm_source` / `clip_source` point elsewhere (a local copy; for a
    run from a released LLaVA, `init_from`, either names the copy of that checkpoint);
    `base_kwargs` go to every base model's `from_pretrained`, `load_kwargs` to the LM's."""
    from transformers import AutoModel, AutoModelForCausalLM, CLIPModel, LlavaProcessor

    from mmpeft.llava.model import build_llava
    from mmpeft.models.quant import keep_cpu_4bit_working
    from mmpeft.models.tokens import add_tokens
    from mmpeft.presets import load_pretrained

    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: not an mmpeft LLaVA checkpoint or output folder")
    settings = json.loads((folder / CONFIG_FILE).read_text())
    processor = LlavaProcessor.from_pretrained(folder)
    base_kwargs = base_kwargs or {}
    if "llava" in settings["sources"]:
        model = _released_base(settings, lm_source, clip_source, base_kwargs, load_kwargs)
    else:
        lm = load_pretrained(lm_source or settings["sources"]["lm"], AutoModelForCausalLM.from_pretrained, "LM",
                             **base_kwargs, **quantized_like(settings, load_kwargs))
        keep_cpu_4bit_working(lm)
        add_tokens(processor.tokenizer, lm, [settings["image_token"]])
        clip = load_pretrained(clip_source or settings["sources"]["clip"], CLIPModel.from_pretrained, "CLIP",
                               **base_kwargs)
        model = build_llava(clip.vision_model, lm, processor.tokenizer.convert_tokens_to_ids(settings["image_token"]),
                            settings["connector"], settings.get("vision_feature_layer", -2),
                            settings.get("connector_options"))
    if (folder / "lm").is_dir():  # the LM was fully fine-tuned: its trained body replaces the base's
        model.model.language_model.load_state_dict(AutoModel.from_pretrained(folder / "lm", **base_kwargs).state_dict())
    model.model.multi_modal_projector.load_state_dict(load_file(folder / "connector.safetensors"))
    if (folder / "llava_adapter").is_dir():
        model = PeftModel.from_pretrained(model, folder / "llava_adapter")
    return model.eval(), processor, settings
