"""Merge a run's LoRA into its base and write a standalone checkpoint.

Each family says what its export holds (see its `export` in `mmpeft/<family>/`):

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
from pathlib import Path

from mmpeft.families import CONFIG_FILE, family_of


def merged(model):
    """`model` with its LoRA merged into the base weights (as it is when it has none)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def published_dtype(source: str):
    """The dtype an LM's `config.json` names (OPT-6.7B's and Vicuna's float16), float32 when
    it names none."""
    import torch
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(source), "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32


def export_merged_lm(folder: str | Path, out: str | Path, lm: str | None, heads_file: str) -> dict:
    """The export of a family whose trained parts are an LM and heads beside it (GILL,
    General-GPT): the merged LM as a plain causal-LM folder (new token rows merged) in its
    base's published dtype (a 6.7B OPT is merged at 13 GB, not as a float32 copy), the
    tokenizer and the run's `heads_file`; returns the run's settings."""
    import shutil

    from mmpeft.loading import load

    settings = json.loads((Path(folder) / CONFIG_FILE).read_text())
    if settings.get("qlora"):  # merged as the family's loader sets up a QLoRA run
        loaded = load(folder, lm=lm)
    else:
        family = family_of(settings.get("recipe", ""), Path(folder) / CONFIG_FILE)
        dtype = published_dtype(lm or settings["sources"]["lm"])
        loaded = family.load(Path(folder), lm, None, None, base_kwargs={"weights_only": True, "dtype": dtype})
    merged(loaded.model.lm).save_pretrained(out)
    loaded.processor.save_pretrained(out)
    shutil.copy(Path(folder) / heads_file, Path(out) / heads_file)
    return loaded.settings


def export_run(folder: str | Path, out: str | Path, lm: str | None = None, clip: str | None = None) -> Path:
    """Write the standalone checkpoint of the run in `folder` (see above) to `out`, which
    must not exist yet; returns `out`."""
    folder, out = Path(folder), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; export writes a new folder")
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE} naming an mmpeft recipe: nothing to export")
    family = family_of(json.loads((folder / CONFIG_FILE).read_text()).get("recipe", ""), folder / CONFIG_FILE)
    if family.export is None:
        raise ValueError(f"{folder}: {family.no_export}")
    settings = family.export(folder, out, lm, clip)
    exported = {**settings, "exported_from": str(folder), "merged": True}
    (out / CONFIG_FILE).write_text(json.dumps(exported, indent=1, sort_keys=True) + "\n")
    return out
