"""`mmpeft.load`: any run folder or pushed repo back to a full model in one call."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .models.llava_io import CONFIG_FILE

# what a load downloads from a repo: weights only as safetensors, never pickles or code
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]


@dataclass
class Loaded:
    """A rebuilt run: `model` (eval mode), `processor` (a `LlavaProcessor`; the tokenizer
    for GILL and General-GPT; for Flamingo an object with `tokenizer` and
    `image_processor`), the run's `settings`, and Stable Diffusion's `pipeline` for
    MiniGPT-5 (GILL's recipes load their pipeline from `settings['sources']`)."""

    model: Any
    processor: Any
    settings: dict
    pipeline: Any = None
    folder: Path = field(default=None)


def run_folder(source: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder as is, else the repo `source` downloaded (safetensors, JSON and
    tokenizer files only) into the Hugging Face cache."""
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(source))
    except HFValidationError as e:
        raise FileNotFoundError(f"{source} is neither a local folder nor a Hub repo id ({e})") from e
    return Path(snapshot_download(str(source), revision=revision, token=token, allow_patterns=DOWNLOAD_PATTERNS))


def load(source: str | Path, revision: str | None = None, lm: str | None = None, clip: str | None = None,
         diffusion: str | None = None, trust_remote_code: bool = False, token: str | None = None) -> Loaded:
    """Rebuild the trained model of a run folder or Hub repo, whatever its recipe. The base
    models come from the sources the run recorded unless `lm`, `clip` or `diffusion` name
    another copy (a local folder, say). Only safetensors weights are read, and no remote
    code runs unless `trust_remote_code` is set."""
    folder = run_folder(source, revision, token)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{source} has no {CONFIG_FILE}: not an mmpeft run")
    settings = json.loads((folder / CONFIG_FILE).read_text())
    if settings.get("merged"):
        raise ValueError(f"{source} is a merged export (mmpeft export): load it with transformers, e.g. "
                         "LlavaForConditionalGeneration.from_pretrained or AutoModelForCausalLM.from_pretrained")
    recipe = settings.get("recipe", "")
    bases = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    if recipe.startswith("llava_"):
        from .models.llava_io import load_llava

        model, processor, settings = load_llava(folder, lm, clip, base_kwargs=bases)
        return Loaded(model, processor, settings, folder=folder)
    if recipe.startswith("minigpt5_"):
        from .models.minigpt5_io import load_minigpt5

        model, processor, pipeline, settings = load_minigpt5(folder, lm, clip, diffusion, base_kwargs=bases)
        return Loaded(model, processor, settings, pipeline, folder=folder)
    if recipe == "gill":
        from .models.gill_io import load_gill

        model, tokenizer, settings = load_gill(folder, lm, base_kwargs=bases)
        return Loaded(model, tokenizer, settings, folder=folder)
    if recipe == "flamingo":
        from types import SimpleNamespace

        from .models.flamingo import load_flamingo

        model, tokenizer, image_processor, settings = load_flamingo(folder, lm, clip, base_kwargs=bases)
        return Loaded(model, SimpleNamespace(tokenizer=tokenizer, image_processor=image_processor), settings,
                      folder=folder)
    if recipe == "general_gpt":
        from .models.general_gpt import load_general_gpt

        model, tokenizer, settings = load_general_gpt(folder, lm, base_kwargs=bases)
        return Loaded(model, tokenizer, settings, folder=folder)
    raise ValueError(f"{folder / CONFIG_FILE}: unknown recipe {recipe!r}")
