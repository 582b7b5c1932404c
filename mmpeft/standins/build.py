"""Stand-ins for LLaVA-1.5-7B's Hub repositories: local folders laid out as
`lmsys/vicuna-7b-v1.5`, `openai/clip-vit-large-patch14-336` and `llava-hf/llava-1.5-7b-hf`,
built from the real configs with only depth and width cut (random, seeded weights) and
the real Llama-2 tokenizer, so the 7B recipes' configs run end to end on a CPU.

    root/lmsys/vicuna-7b-v1.5/              LlamaForCausalLM, generation config, tokenizer
    root/openai/clip-vit-large-patch14-336/ CLIPModel, CLIP's image processor, a stand-in
                                            CLIP tokenizer (see its README.md)
    root/llava-hf/llava-1.5-7b-hf/          LlavaForConditionalGeneration + LlavaProcessor

Each folder's `standin.json` lists every value that differs from the real repository.
`root/complete.json`, written last, marks a finished build; a later call returns at once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mmpeft.standins.clip_vocab import write_clip_tokenizer
from mmpeft.standins.tokenizers import llama2_tokenizer

VICUNA, CLIP, LLAVA = "lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336", "llava-hf/llava-1.5-7b-hf"
MARKER = "complete.json"
VERSION = 1  # raise when the folders' contents change, so that old caches are rebuilt
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

# CLIP ViT-L/14-336's config.json: vision and text towers
CLIP_VISION_REAL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
CLIP_VISION_CUT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
CLIP_VISION_FIXED = dict(image_size=336, patch_size=14, num_channels=3, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, projection_dim=768)
CLIP_TEXT_REAL = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_TEXT_CUT = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
CLIP_TEXT_FIXED = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                       projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
CLIP_PROJECTION = {"real": 768, "cut": 32}
CLIP_LOGIT_SCALE_INIT = 2.6592  # ln(1 / 0.07), CLIP's initial temperature
# CLIP's own preprocessing (preprocessor_config.json of every openai/clip-vit-* repo, at 336)
CLIP_IMAGE = dict(do_resize=True, size={"shortest_edge": 336}, resample=3, do_center_crop=True,
                  crop_size={"height": 336, "width": 336}, do_rescale=True, rescale_factor=1 / 255,
                  do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                  image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)

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


def standin_root(cache: str | Path | None = None) -> Path:
    """`<cache>/standins/`, the cache as `mmpeft.tiny.cache_root` finds it."""
    from mmpeft.tiny import cache_root

    return cache_root(str(cache) if cache else None, os.environ) / "standins"


def build_standins(root: str | Path, full_size: bool = False, vocab_cache: str | Path | None = None
                   ) -> dict[str, Path]:
    """Write (or find) the three stand-in repositories under `root`; returns
    `{"lm": ..., "clip": ..., "llava": ...}`, each `root/<Hub id>`. Depth and width are cut
    unless `full_size` (real sizes: about 14 GB each for Vicuna and LLaVA, for GPU
    rehearsals); a finished build for the same `full_size` is reused as it is. The Llama-2
    vocabulary comes from `llama2_tokenizer(vocab_cache)`."""
    root = Path(root)
    folders = {"lm": root / VICUNA, "clip": root / CLIP, "llava": root / LLAVA}
    expected = {"version": VERSION, "full_size": full_size, "seed": SEED}
    try:
        if json.loads((root / MARKER).read_text()) == expected:
            return folders
    except (OSError, ValueError):
        pass
    for folder in folders.values():  # an unfinished or other-sized build is rebuilt from scratch
        shutil.rmtree(folder, ignore_errors=True)
    (root / MARKER).unlink(missing_ok=True)
    lm = build_vicuna(folders["lm"], full_size, vocab_cache)
    clip = build_clip(folders["clip"], full_size)
    build_llava_hf(folders["llava"], lm, clip, full_size)
    (root / MARKER).write_text(json.dumps(expected) + "\n")
    return folders


def _sizes(real: dict, cut: dict, full_size: bool) -> dict:
    return real if full_size else cut


def _record(folder: Path, source: str, cut: dict, full_size: bool, notes: list[str]) -> None:
    (folder / "standin.json").write_text(json.dumps(
        {"stands_in_for": source, "full_size": full_size, "seed": SEED, "weights": "random",
         "cut": {} if full_size else cut, "notes": notes}, indent=1) + "\n")


def _diff(real: dict, cut: dict) -> dict:
    return {k: {"real": real[k], "standin": cut[k]} for k in real if real[k] != cut[k]}


def build_vicuna(folder: Path, full_size: bool = False, vocab_cache: str | Path | None = None):
    """`lmsys/vicuna-7b-v1.5`'s layout: `LlamaForCausalLM` in float16 (as published), its
    generation config and the real Llama-2 tokenizer with Vicuna's tokenizer_config (no pad
    token). Returns the model, which the LLaVA build then takes apart."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    torch.manual_seed(SEED)
    config = LlamaConfig(**_sizes(VICUNA_REAL, VICUNA_CUT, full_size), **VICUNA_FIXED)
    config.architectures = ["LlamaForCausalLM"]
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()  # no float32 copy at full size
    lm.save_pretrained(folder)
    GenerationConfig(**VICUNA_GENERATION).save_pretrained(folder)
    tokenizer = llama2_tokenizer(vocab_cache)
    tokenizer.pad_token = None  # Vicuna v1.5 names none; LLaVA's train.py sets <unk>
    tokenizer.save_pretrained(folder)
    _edit_json(folder / "tokenizer_config.json", tokenizer_class="LlamaTokenizer", add_bos_token=True,
               add_eos_token=False, legacy=False, clean_up_tokenization_spaces=False, model_max_length=4096,
               padding_side="right", pad_token=None)
    _record(folder, VICUNA, _diff(VICUNA_REAL, VICUNA_CUT), full_size, [
        "tokenizer: the real Llama-2 SentencePiece vocabulary as tokenizer.json (no tokenizer.model)",
        "generation_config.json: Vicuna v1.5's published values"])
    return lm


def build_clip(folder: Path, full_size: bool = False):
    """`openai/clip-vit-large-patch14-336`'s layout: `CLIPModel` (float32, as published),
    CLIP's image preprocessing and a stand-in CLIP tokenizer. Returns the model, which the
    LLaVA build then takes apart."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(SEED)
    projection = CLIP_PROJECTION["real" if full_size else "cut"]
    vision = {**_sizes(CLIP_VISION_REAL, CLIP_VISION_CUT, full_size), **CLIP_VISION_FIXED, "projection_dim": projection}
    text = {**_sizes(CLIP_TEXT_REAL, CLIP_TEXT_CUT, full_size), **CLIP_TEXT_FIXED, "projection_dim": projection}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection,
                        logit_scale_init_value=CLIP_LOGIT_SCALE_INIT)
    config.architectures = ["CLIPModel"]
    clip = CLIPModel(config).eval()
    clip.save_pretrained(folder)
    CLIPImageProcessor(**CLIP_IMAGE).save_pretrained(folder)
    write_clip_tokenizer(folder)
    cut = {"vision_config": _diff(CLIP_VISION_REAL, CLIP_VISION_CUT),
           "text_config": _diff(CLIP_TEXT_REAL, CLIP_TEXT_CUT),
           "projection_dim": {"real": CLIP_PROJECTION["real"], "standin": CLIP_PROJECTION["cut"]}}
    _record(folder, CLIP, cut, full_size, [
        "tokenizer: a STAND-IN CLIP tokenizer (small generated BPE vocabulary with CLIP's special tokens, "
        "max length 77), not CLIP's 49,408-token BPE; see README.md"])
    return clip


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
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(**CLIP_IMAGE), tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", image_token=LLAVA_IMAGE_TOKEN,
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    _edit_json(folder / "tokenizer_config.json", model_max_length=4096, padding_side="left")
    cut = {"text_config": _diff(VICUNA_REAL, VICUNA_CUT), "vision_config": _diff(CLIP_VISION_REAL, CLIP_VISION_CUT),
           "multi_modal_projector": {"real": "1024 -> 4096 -> 4096",
                                     "standin": f"{vision.hidden_size} -> {lm.config.hidden_size} -> "
                                                f"{lm.config.hidden_size}"}}
    _record(folder, LLAVA, cut, full_size, [
        "weights: the Vicuna and CLIP stand-ins' (vision tower in full, all its layers) and a random projector; "
        "rows 32000-32063 of the embeddings and head at the mean of the first 32000",
        "chat_template: LLaVA-1.5's conv_vicuna_v1 written for this stand-in, not copied from llava-hf"])


def _edit_json(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    for key in ("backend", "is_local", "local_files_only"):  # written by this transformers, not in the Hub's files
        data.pop(key, None)
    path.write_text(json.dumps({**data, **values}, indent=2, sort_keys=True) + "\n")
