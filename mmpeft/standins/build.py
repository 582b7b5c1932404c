"""Stand-ins for the Hub repositories of the models the 7B recipes load: local folders laid
out as the real repositories, built from the real configs with only depth and width cut
(random, seeded weights) and the real tokenizers, so the recipes' real configs run end to end
on a CPU.

    root/lmsys/vicuna-7b-v1.5/                      LlamaForCausalLM, generation config, Llama-2 tokenizer
    root/openai/clip-vit-large-patch14-336/         CLIPModel at 336 px, CLIP's preprocessing and tokenizer
    root/llava-hf/llava-1.5-7b-hf/                  LlavaForConditionalGeneration + LlavaProcessor
    root/openai/clip-vit-large-patch14/             CLIPModel at 224 px (GILL's)
    root/stabilityai/stable-diffusion-2-1-base/     StableDiffusionPipeline, 512 px, epsilon (MiniGPT-5's)
    root/stabilityai/stable-diffusion-2-1/          StableDiffusionPipeline, 768 px, v-prediction
    root/stable-diffusion-v1-5/stable-diffusion-v1-5/  StableDiffusionPipeline with safety checker (GILL's)
    root/facebook/opt-6.7b/                         OPTForCausalLM, tied, sharded .bin weights (GILL's)

`STANDINS` lists them in build order, each with the key `build_standins` answers it under.
Each folder's `standin.json` lists every value that differs from the real repository.
`root/complete.json`, written last, marks a finished build; a later call returns at once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmpeft.standins.clip import (
    CLIP_224,
    CLIP_336,
    CLIP_VISION_CUT,
    CLIP_VISION_REAL,
    build_clip,
    clip_image_processing,
)
from mmpeft.standins.diffusion import SD15, SD21_BASE, SD21_V, build_stable_diffusion
from mmpeft.standins.opt import OPT, build_opt
from mmpeft.standins.record import diff, edit_json, record, sizes
from mmpeft.standins.tokenizers import llama2_tokenizer

VICUNA, LLAVA = "lmsys/vicuna-7b-v1.5", "llava-hf/llava-1.5-7b-hf"
MARKER = "complete.json"
VERSION = 3  # raise when the folders' contents change, so that old caches are rebuilt
SEED = 0

# Vicuna-7B v1.5's config.json (Llama-2-7B's architecture); CUT: the stand-in's depth and width
VICUNA_REAL = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32)
VICUNA_CUT = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4)
VICUNA_FIXED = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu",
                    initializer_range=0.02, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0, attention_bias=False, mlp_bias=False, pretraining_tp=1, use_cache=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# Vicuna v1.5's generation_config.json as published (sampling on, FastChat's defaults)
VICUNA_GENERATION = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.9,
                         top_p=0.6, max_length=4096)

# llava-hf/llava-1.5-7b-hf: `<image>` 32000 and `<pad>` 32001 added to Llama-2's tokenizer,
# the embeddings padded to a multiple of 64
LLAVA_IMAGE_TOKEN, LLAVA_PAD_TOKEN, LLAVA_VOCAB = "<image>", "<pad>", 32064
# LLaVA-1.5's `conv_vicuna_v1` for transformers' chat API: images before the text of their turn
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class Standin:
    """One stand-in repository: the key `build_standins` answers it under, the Hub id it
    stands in for (its folder under the root), the keys of earlier stand-ins whose built
    models it takes apart, and `build(folder, full_size, vocab_cache, *those models)`, which
    writes the folder and returns the model a later stand-in takes (or None)."""

    key: str
    repo: str
    build: Callable
    takes: tuple[str, ...] = ()


STANDINS = (
    Standin("lm", VICUNA, lambda folder, full_size, cache: build_vicuna(folder, full_size, cache)),
    Standin("clip", CLIP_336.repo, lambda folder, full_size, cache: build_clip(folder, full_size, cache, CLIP_336)),
    Standin("llava", LLAVA, lambda folder, full_size, cache, lm, clip: build_llava_hf(folder, lm, clip, full_size),
            takes=("lm", "clip")),
    Standin("clip224", CLIP_224.repo, lambda folder, full_size, cache: build_clip(folder, full_size, cache, CLIP_224)),
    Standin("sd21_base", SD21_BASE.repo,
            lambda folder, full_size, cache: build_stable_diffusion(folder, SD21_BASE, full_size, cache)),
    Standin("sd21_v", SD21_V.repo,
            lambda folder, full_size, cache: build_stable_diffusion(folder, SD21_V, full_size, cache)),
    Standin("sd15", SD15.repo,
            lambda folder, full_size, cache, clip: build_stable_diffusion(folder, SD15, full_size, cache, clip),
            takes=("clip224",)),
    Standin("opt", OPT, lambda folder, full_size, cache: build_opt(folder, full_size, cache)),
)


def standin_root(cache: str | Path | None = None) -> Path:
    """`<cache>/standins/`, the cache as `mmpeft.tiny.cache_root` finds it."""
    from mmpeft.tiny import cache_root

    return cache_root(str(cache) if cache else None, os.environ) / "standins"


def build_standins(root: str | Path, full_size: bool = False, vocab_cache: str | Path | None = None,
                   standins: tuple[Standin, ...] = STANDINS) -> dict[str, Path]:
    """Write (or find) the stand-in repositories of `standins` under `root`, in order;
    returns `{key: root/<Hub id>}` (keys "lm", "clip", "llava", "clip224", "sd21_base",
    "sd21_v", "sd15"). Depth and width are cut unless `full_size` (real sizes: about 14 GB
    each for Vicuna and LLaVA, about 5 GB for each Stable Diffusion, for GPU rehearsals); a
    finished build of the same stand-ins and `full_size` is reused as it is. The Llama-2
    vocabulary and CLIP's merges come from the cache `vocab_cache` (see `tokenizers`,
    `clip_vocab`)."""
    root = Path(root)
    problems = _check_table(standins)
    if problems:
        raise ValueError("stand-in table: " + "; ".join(problems))
    folders = {s.key: root / s.repo for s in standins}
    expected = {"version": VERSION, "full_size": full_size, "seed": SEED, "standins": list(folders)}
    try:
        if json.loads((root / MARKER).read_text()) == expected:
            return folders
    except (OSError, ValueError):
        pass
    for folder in folders.values():  # an unfinished or other-sized build is rebuilt from scratch
        shutil.rmtree(folder, ignore_errors=True)
    (root / MARKER).unlink(missing_ok=True)
    built = {}
    for k, standin in enumerate(standins):
        built[standin.key] = standin.build(folders[standin.key], full_size, vocab_cache,
                                           *(built[t] for t in standin.takes))
        later = {t for s in standins[k + 1:] for t in s.takes}
        built = {key: model for key, model in built.items() if key in later}  # at full size, free memory early
    (root / MARKER).write_text(json.dumps(expected) + "\n")
    return folders


def _check_table(standins: tuple[Standin, ...]) -> list[str]:
    problems, seen, repos = [], set(), set()
    for s in standins:
        if s.key in seen:
            problems.append(f"key {s.key!r} appears twice")
        if s.repo in repos:
            problems.append(f"{s.repo} appears twice")
        problems += [f"{s.key!r} takes {t!r}, which is not built before it" for t in s.takes if t not in seen]
        seen.add(s.key)
        repos.add(s.repo)
    return problems


def build_vicuna(folder: Path, full_size: bool = False, vocab_cache: str | Path | None = None):
    """`lmsys/vicuna-7b-v1.5`'s layout: `LlamaForCausalLM` in float16 (as published), its
    generation config and the real Llama-2 tokenizer with Vicuna's tokenizer_config (no pad
    token). Returns the model, which the LLaVA build then takes apart."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    torch.manual_seed(SEED)
    config = LlamaConfig(**sizes(VICUNA_REAL, VICUNA_CUT, full_size), **VICUNA_FIXED)
    config.architectures = ["LlamaForCausalLM"]
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()  # no float32 copy at full size
    lm.save_pretrained(folder)
    GenerationConfig(**VICUNA_GENERATION).save_pretrained(folder)
    tokenizer = llama2_tokenizer(vocab_cache)
    tokenizer.pad_token = None  # Vicuna v1.5 names none; LLaVA's train.py sets <unk>
    tokenizer.save_pretrained(folder)
    edit_json(folder / "tokenizer_config.json", tokenizer_class="LlamaTokenizer", add_bos_token=True,
              add_eos_token=False, legacy=False, clean_up_tokenization_spaces=False, model_max_length=4096,
              padding_side="right", pad_token=None)
    record(folder, VICUNA, diff(VICUNA_REAL, VICUNA_CUT), full_size, SEED, [
        "tokenizer: the real Llama-2 SentencePiece vocabulary as tokenizer.json (no tokenizer.model)",
        "generation_config.json: Vicuna v1.5's published values"])
    return lm


def build_llava_hf(folder: Path, lm, clip, full_size: bool = False) -> None:
    """`llava-hf/llava-1.5-7b-hf`'s layout: a native `LlavaForConditionalGeneration` made of
    the Vicuna and CLIP stand-ins and a seeded mlp2x_gelu projector, with its `LlavaProcessor`
    (`<image>` 32000, `<pad>` 32001, embeddings padded to 32064 rows; new rows at the mean of
    the old ones)."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    tokenizer = AutoTokenizer.from_pretrained(folder.parent.parent / VICUNA)
    tokenizer.add_special_tokens({"additional_special_tokens": [LLAVA_IMAGE_TOKEN]})
    tokenizer.add_special_tokens({"pad_token": LLAVA_PAD_TOKEN})
    ids = tokenizer.convert_tokens_to_ids([LLAVA_IMAGE_TOKEN, LLAVA_PAD_TOKEN])
    if ids != [32000, 32001]:  # llava-hf's ids; a tokenizer with other added tokens would shift them
        raise ValueError(f"<image>, <pad> got ids {ids}; llava-hf/llava-1.5-7b-hf has 32000, 32001")
    vision = clip.vision_model.config
    text = lm.config.to_dict() | {"vocab_size": LLAVA_VOCAB, "pad_token_id": None}
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text, image_token_index=ids[0],
                         image_seq_length=(vision.image_size // vision.patch_size) ** 2, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=ids[1],
                         tie_word_embeddings=False)
    config.architectures = ["LlavaForConditionalGeneration"]
    # the shell on the meta device, its parts moved in (no full-size copy of the weights)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    old = lm.config.vocab_size
    lm.resize_token_embeddings(LLAVA_VOCAB, mean_resizing=False)
    with torch.no_grad():  # rows of the added and padding tokens
        for matrix in (lm.get_input_embeddings(), lm.get_output_embeddings()):
            matrix.weight[old:] = matrix.weight[:old].float().mean(0, keepdim=True).to(matrix.weight.dtype)
    llava.model.vision_tower, llava.model.language_model, llava.lm_head = clip.vision_model, lm.model, lm.lm_head
    torch.manual_seed(SEED + 1)
    llava.model.multi_modal_projector = LlavaMultiModalProjector(config)
    meta = [name for name, tensor in [*llava.named_parameters(), *llava.named_buffers()] if tensor.is_meta]
    if meta:
        raise RuntimeError(f"LLaVA stand-in: parts left on the meta device: {meta}")
    llava.to(torch.float16).save_pretrained(folder)
    image_processor = CLIPImageProcessor(**clip_image_processing(CLIP_336.image_size))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", image_token=LLAVA_IMAGE_TOKEN,
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    edit_json(folder / "tokenizer_config.json", model_max_length=4096, padding_side="left")
    cut = {"text_config": diff(VICUNA_REAL, VICUNA_CUT), "vision_config": diff(CLIP_VISION_REAL, CLIP_VISION_CUT),
           "multi_modal_projector": {"real": "1024 -> 4096 -> 4096",
                                     "standin": f"{vision.hidden_size} -> {lm.config.hidden_size} -> "
                                                f"{lm.config.hidden_size}"}}
    record(folder, LLAVA, cut, full_size, SEED, [
        "weights: the Vicuna and CLIP stand-ins' (vision tower in full, all its layers) and a random projector; "
        "rows 32000-32063 of the embeddings and head at the mean of the first 32000",
        "chat_template: LLaVA-1.5's conv_vicuna_v1 written for this stand-in, not copied from llava-hf"])
