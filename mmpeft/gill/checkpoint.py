"""Building GILL from a preset, and what a run writes and loads back.

    mmpeft_config.json        sources of the frozen bases and every setting needed to rebuild
    lm_adapter/               PEFT adapter of the LM: the [IMG] rows (and LoRA, when used)
    gill_heads.safetensors    image input map, retrieval head, generation mapper, decision head
    tokenizer files           with `<image>` and `[IMG0]`..`[IMG7]`
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from mmpeft.families import CONFIG_FILE
from mmpeft.gill.model import GILL, DecisionHead, GillWeights, ImageInput, RetrievalHead, gill_parts
from mmpeft.llava.checkpoint import lm_load_kwargs
from mmpeft.minigpt5.model import VokenMapper
from mmpeft.models.quant import keep_cpu_4bit_working
from mmpeft.models.tokens import add_tokens
from mmpeft.models.vokens import voken_names

HEADS_FILE = "gill_heads.safetensors"


def build_gill(lm, tokenizer, clip_dim: int, image_token: str, n_vokens: int, image_tokens: int, retrieval_dim: int,
               mapper: dict, decision_dropout: float, weights: dict | None = None,
               base_tokens: int | None = None) -> GILL:
    """Add `<image>` and the `[IMG]` tokens to tokenizer and LM (new rows at the mean of the
    base vocabulary's `base_tokens` rows, see `add_tokens`) and build the heads around the
    LM; `mapper` holds `VokenMapper`'s arguments."""
    ids = add_tokens(tokenizer, lm, [image_token, *voken_names(n_vokens)], base_tokens=base_tokens)
    hidden = lm.config.hidden_size
    return GILL(lm, ImageInput(clip_dim, hidden, image_tokens), RetrievalHead(hidden, clip_dim, retrieval_dim),
                VokenMapper(**mapper), DecisionHead(hidden, decision_dropout), ids[0], ids[1:],
                GillWeights(**(weights or {})))


def save_gill(model: GILL, folder: str | Path, tokenizer, settings: dict) -> None:
    """Write the files above; `settings` holds `sources` and `build_gill`'s arguments."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model.lm, PeftModel):
        # the new rows are rebuilt at load (mean of the old); the adapter carries the trained ones
        model.lm.save_pretrained(folder / "lm_adapter", save_embedding_layers=False)
    heads = {f"{part}.{k}": v.detach().cpu().contiguous() for part, module in gill_parts(model).items()
             for k, v in module.state_dict().items()}
    save_file(heads, folder / HEADS_FILE)
    tokenizer.save_pretrained(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def load_gill(folder: str | Path, lm_source: str | None = None, base_kwargs: dict | None = None,
              dtype: torch.dtype = torch.float32):
    """Rebuild a trained GILL from an output or checkpoint folder; returns `(model,
    tokenizer, settings)` with the model in eval mode, the LM and heads in `dtype` (not the
    LM's published one: OPT-6.7B's is float16, and the heads must match the LM; a QLoRA run
    in the compute dtype it trained with). `base_kwargs` go to the LM's `from_pretrained`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / HEADS_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a GILL output or checkpoint folder (needs {CONFIG_FILE} and "
                                f"{HEADS_FILE})")
    settings = json.loads((folder / CONFIG_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs, dtype = lm_load_kwargs(settings, base_kwargs or {}, dtype)  # a QLoRA run: 4 bits, its compute dtype
    lm = AutoModelForCausalLM.from_pretrained(lm_source or settings["sources"]["lm"], **kwargs)
    keep_cpu_4bit_working(lm)
    model = build_gill(lm, tokenizer, **settings["build"])
    if (folder / "lm_adapter").is_dir():
        model.lm = PeftModel.from_pretrained(model.lm, folder / "lm_adapter")
    heads = load_file(folder / HEADS_FILE)
    for part, module in gill_parts(model).items():
        module.load_state_dict({k[len(part) + 1:]: v for k, v in heads.items() if k.startswith(part + ".")})
        module.to(dtype)
    return model.eval(), tokenizer, settings


@torch.no_grad()
def index_embeddings(model: GILL, clip_embeds: torch.Tensor) -> torch.Tensor:
    """The retrieval head's image embeddings for CLIP embeddings (for an index)."""
    return model.retrieval.embed_image(clip_embeds)
