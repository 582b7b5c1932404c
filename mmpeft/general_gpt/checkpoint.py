"""What a General-GPT run writes and the one call that loads it back onto its base LM."""

from __future__ import annotations

from mmpeft.families import CONFIG_FILE
from mmpeft.general_gpt.model import GeneralGPT, add_general_gpt_tokens

HEADS_FILE = "general_gpt.safetensors"  # embed_in and embed_out


def save_general_gpt(model: GeneralGPT, folder, tokenizer, settings: dict) -> None:
    """`general_gpt.safetensors` (`embed_in`, `embed_out`), `lm_adapter/` (the new tokens'
    rows and any LoRA), the tokenizer and `mmpeft_config.json`."""
    import json
    from pathlib import Path

    from peft import PeftModel
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model.lm, PeftModel):
        model.lm.save_pretrained(folder / "lm_adapter", save_embedding_layers=False)
    save_file({f"{part}.{k}": v.detach().cpu().contiguous() for part in ("embed_in", "embed_out")
               for k, v in getattr(model, part).state_dict().items()}, folder / HEADS_FILE)
    tokenizer.save_pretrained(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")



def load_general_gpt(folder, lm_source: str | None = None, base_kwargs: dict | None = None):
    """Rebuild a trained General-GPT from an output or checkpoint folder: `(model,
    tokenizer, settings)`, the model in eval mode; `base_kwargs` go to the LM's
    `from_pretrained`."""
    import json
    from pathlib import Path

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmpeft.llava.checkpoint import quantized_like
    from mmpeft.models.quant import keep_cpu_4bit_working

    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / HEADS_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a General-GPT output or checkpoint folder "
                                f"(needs {CONFIG_FILE} and {HEADS_FILE})")
    settings = json.loads((folder / CONFIG_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = keep_cpu_4bit_working(AutoModelForCausalLM.from_pretrained(
        lm_source or settings["sources"]["lm"], **(base_kwargs or {}), **quantized_like(settings, {})))
    ids = add_general_gpt_tokens(tokenizer, lm)
    if (folder / "lm_adapter").is_dir():
        lm = PeftModel.from_pretrained(lm, folder / "lm_adapter")
    model = GeneralGPT(lm, ids, settings["embed_dim"], settings["mse_weight"])
    heads = load_file(folder / HEADS_FILE)
    for part in ("embed_in", "embed_out"):
        getattr(model, part).load_state_dict({k[len(part) + 1:]: v for k, v in heads.items()
                                              if k.startswith(part + ".")})
    return model.eval(), tokenizer, settings
