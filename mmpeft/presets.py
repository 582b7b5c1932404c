"""Preset names mapped to model sources, and the loaders that read them.

`tiny` points into the zoo that mmpeft builds on the tiny world; the others name the Hub
ids the papers used. Every source, zoo folder or Hub id, goes through the same
`from_pretrained` call; a source that is neither a folder nor reachable raises an error
that names the preset, the part, the source and how to provide it offline.
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


def load_lm(preset: Preset, **kwargs):
    """`(AutoModelForCausalLM, AutoTokenizer)` from the preset's LM source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmpeft.models.quant import keep_cpu_4bit_working

    lm = keep_cpu_4bit_working(_load(preset, "lm", AutoModelForCausalLM.from_pretrained, **kwargs))
    return lm, _load(preset, "lm", AutoTokenizer.from_pretrained)


def load_clip(preset: Preset, **kwargs):
    """`(CLIPModel, CLIPProcessor)` from the preset's CLIP source."""
    from transformers import CLIPModel, CLIPProcessor

    return _load(preset, "clip", CLIPModel.from_pretrained, **kwargs), _load(
        preset, "clip", CLIPProcessor.from_pretrained)


def load_diffusion(preset: Preset, **kwargs):
    """A `StableDiffusionPipeline` from the preset's diffusion source."""
    from diffusers import StableDiffusionPipeline

    pipeline = _load(preset, "diffusion", StableDiffusionPipeline.from_pretrained, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
