"""What a Flamingo run writes (the resampler and the gated cross-attention layers) and the
one call that loads it back onto its frozen bases."""

from __future__ import annotations

from mmpeft.families import CONFIG_FILE
from mmpeft.flamingo.model import FlamingoLM

WEIGHTS_FILE = "flamingo.safetensors"  # the resampler and the cross-attention layers


def save_flamingo(model: FlamingoLM, folder, tokenizer, image_processor, settings: dict) -> None:
    """The trained parts (`flamingo.safetensors`: `resampler.*`, `xattn.*`), the tokenizer
    with `<image>`, the image processor and `mmpeft_config.json` (sources and options)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"{name}.{k}": v.detach().cpu().contiguous()
             for name, part in model.trainable_parts().items() for k, v in part.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")



def load_flamingo(folder, lm_source: str | None = None, clip_source: str | None = None,
                  base_kwargs: dict | None = None):
    """Rebuild a trained Flamingo from an output or checkpoint folder: `(model, tokenizer,
    image_processor, settings)`. The LM and CLIP come from the sources recorded at training
    time unless `lm_source` / `clip_source` point elsewhere; `base_kwargs` go to both
    `from_pretrained` calls."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPModel

    from mmpeft.llava.checkpoint import quantized_like
    from mmpeft.models.quant import keep_cpu_4bit_working
    from mmpeft.models.tokens import add_tokens

    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a Flamingo output or checkpoint folder "
                                f"(needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    settings = json.loads((folder / CONFIG_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base_kwargs = base_kwargs or {}
    lm = AutoModelForCausalLM.from_pretrained(lm_source or settings["sources"]["lm"], **base_kwargs,
                                              **quantized_like(settings, {}))
    keep_cpu_4bit_working(lm)
    image_id = add_tokens(tokenizer, lm, [settings["image_token"]])[0]
    clip = CLIPModel.from_pretrained(clip_source or settings["sources"]["clip"], **base_kwargs)
    model = FlamingoLM(lm, clip.vision_model, image_id, settings["vision_feature_layer"],
                       settings["resampler_options"], settings["xattn_options"])
    missing, unexpected = model.load_state_dict(load_file(folder / WEIGHTS_FILE), strict=False)
    trained = {f"{n}." for n in model.trainable_parts()}
    if unexpected or any(k.startswith(tuple(trained)) for k in missing):
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match the model its settings describe "
                         f"(missing {sorted(k for k in missing if k.startswith(tuple(trained)))[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    return model.eval(), tokenizer, AutoImageProcessor.from_pretrained(folder), settings
