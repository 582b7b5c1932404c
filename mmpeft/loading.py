"""`mmpeft.load`: any run folder or pushed repo back to a full model in one call."""

from __future__ import annotations

import json
from pathlib import Path

from mmpeft.families import CONFIG_FILE, Loaded, family_of

# what a load downloads from a repo: weights only as safetensors, never pickles or code
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]


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
    another copy (a local folder, say). A run's own files are read as safetensors; a base
    published only as `pytorch_model*.bin` (OPT-6.7B, say) is read with
    `torch.load(weights_only=True)`, tensors only. No remote code runs unless
    `trust_remote_code` is set."""
    folder = run_folder(source, revision, token)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{source} has no {CONFIG_FILE}: not an mmpeft run")
    settings = json.loads((folder / CONFIG_FILE).read_text())
    if settings.get("merged"):
        raise ValueError(f"{source} is a merged export (mmpeft export): load it with transformers, e.g. "
                         "LlavaForConditionalGeneration.from_pretrained or AutoModelForCausalLM.from_pretrained")
    family = family_of(settings.get("recipe", ""), folder / CONFIG_FILE)
    bases = {"weights_only": True, "trust_remote_code": trust_remote_code}
    return family.load(folder, lm, clip, diffusion, base_kwargs=bases)
