"""Preset names mapped to model sources, and the loaders that read them.

`tiny` points into the zoo that mmpeft builds on the tiny world; the others name the Hub
ids the papers used. Every source, zoo folder or Hub id, goes through the same
`from_pretrained` call; a source that is neither a folder nor reachable raises an error
that names the preset, the part, the source and how to provide it offline. Model weights
are read from safetensors; a source published only as `pytorch_model*.bin` (many older
checkpoints) is read from those, with a one-line note (see `load_pretrained`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    """Sources of the parts a recipe may load: causal LM (with its tokenizer), CLIP
    (model and processor) and a Stable Diffusion pipeline folder. `None`: not part of
    this preset."""

    name: str
    lm: str | None = None
    clip: str | None = None
    diffusion: str | None = None


PRESETS = {
    "tiny": Preset("tiny", lm="zoo:lm", clip="zoo:clip", diffusion="zoo:sd"),
    "llava-1.5-7b": Preset("llava-1.5-7b", lm="lmsys/vicuna-7b-v1.5", clip="openai/clip-vit-large-patch14-336"),
    "llava-1.5-13b": Preset("llava-1.5-13b", lm="lmsys/vicuna-13b-v1.5",
                            clip="openai/clip-vit-large-patch14-336"),
    "minigpt5": Preset("minigpt5", lm="lmsys/vicuna-7b-v1.5", clip="openai/clip-vit-large-patch14-336",
                       diffusion="stabilityai/stable-diffusion-2-1-base"),
    "gill": Preset("gill", lm="facebook/opt-6.7b", clip="openai/clip-vit-large-patch14",
                   diffusion="stable-diffusion-v1-5/stable-diffusion-v1-5"),
}


def resolve_preset(name: str, zoo_dir: str | Path | None = None, **overrides: str | None) -> Preset:
    """The preset's sources with `zoo:` entries turned into folders of `zoo_dir` and any
    part replaced by an override (a local path or another Hub id)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; known presets: {', '.join(sorted(PRESETS))}")
    preset = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    resolved = {}
    for part in ("lm", "clip", "diffusion"):
        source = getattr(preset, part)
        if source and source.startswith("zoo:"):
            if zoo_dir is None:
                raise ValueError(f"preset '{name}': part '{part}' comes from the tiny zoo, but no zoo folder was given")
            source = str(Path(zoo_dir) / source.removeprefix("zoo:"))
        resolved[part] = source
    return replace(preset, **resolved)


def _load(preset: Preset, part: str, loader, **kwargs):
    source = getattr(preset, part)
    if source is None:
        raise ValueError(f"preset '{preset.name}' has no '{part}' part")
    try:
        return loader(source, **kwargs)
    except OSError as err:
        raise OSError(
            f"preset '{preset.name}': cannot load the {part} from '{source}': {err}\n"
            f"Offline, download it on a connected machine (huggingface-cli download {source}) and pass its "
            f"local folder instead, e.g. --{part}_path /models/{source.split('/')[-1]}"
        ) from err


def _has_file(source: str, name: str) -> bool:
    path = Path(source)
    if path.is_dir():
        return (path / name).is_file()
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(source, name), str)  # what a load just fetched is in the cache


def read_bin_weights(source: str) -> bool:
    """Whether `from_pretrained` reads `source` (a folder, or a Hub repo already loaded once,
    hence in the local cache) from `pytorch_model*.bin`: it has those and no safetensors."""
    if _has_file(source, "model.safetensors") or _has_file(source, "model.safetensors.index.json"):
        return False
    return _has_file(source, "pytorch_model.bin") or _has_file(source, "pytorch_model.bin.index.json")


def load_pretrained(source: str, from_pretrained, what: str = "model", log=print, **kwargs):
    """`from_pretrained(source, **kwargs)` for model weights. transformers reads safetensors
    when the source has them, else its `pytorch_model*.bin` with `torch.load(weights_only=True)`
    (tensors only, no code runs); then `log` gets a one-line note naming `what` and the
    source. `use_safetensors=True` in `kwargs` still refuses a `.bin`-only source."""
    model = from_pretrained(source, **{"weights_only": True, **kwargs})
    if kwargs.get("use_safetensors") is None and read_bin_weights(str(source)):
        log(f"note: the {what} at {source} has no safetensors weights, so its pytorch_model*.bin was read "
            "(torch.load with weights_only=True)")
    return model


def load_lm(preset: Preset, log=print, **kwargs):
    """`(AutoModelForCausalLM, AutoTokenizer)` from the preset's LM source (weights as
    `load_pretrained` reads them, its note to `log`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmpeft.models.quant import keep_cpu_4bit_working

    lm = _load(preset, "lm", load_pretrained, from_pretrained=AutoModelForCausalLM.from_pretrained,
               what=f"LM of preset '{preset.name}'", log=log, **kwargs)
    return keep_cpu_4bit_working(lm), _load(preset, "lm", AutoTokenizer.from_pretrained)


def load_clip(preset: Preset, log=print, **kwargs):
    """`(CLIPModel, CLIPProcessor)` from the preset's CLIP source (weights as
    `load_pretrained` reads them, its note to `log`)."""
    from transformers import CLIPModel, CLIPProcessor

    clip = _load(preset, "clip", load_pretrained, from_pretrained=CLIPModel.from_pretrained,
                 what=f"CLIP of preset '{preset.name}'", log=log, **kwargs)
    return clip, _load(preset, "clip", CLIPProcessor.from_pretrained)


def load_diffusion(preset: Preset, **kwargs):
    """A `StableDiffusionPipeline` from the preset's diffusion source."""
    from diffusers import StableDiffusionPipeline

    pipeline = _load(preset, "diffusion", StableDiffusionPipeline.from_pretrained, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
