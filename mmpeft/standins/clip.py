"""Stand-ins for CLIP ViT-L/14's Hub repositories: `openai/clip-vit-large-patch14-336`
(LLaVA-1.5's and MiniGPT-5's vision tower) and `openai/clip-vit-large-patch14` (GILL's, at
224 px). Each is a `CLIPModel` from the real config with only depth and width cut, random
seeded weights in float32 (as published), CLIP's real preprocessing and CLIP's real BPE
tokenizer (`clip_vocab`).

The 224 px model's text tower keeps its real width (768): it is also Stable Diffusion 1.5's
text encoder, whose width is the UNet's cross-attention width (`diffusion`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmpeft.standins.clip_vocab import write_clip_tokenizer
from mmpeft.standins.record import diff, record, sizes

SEED = 0

# openai/clip-vit-large-patch14{,-336}'s config.json: the two share all but the image size
CLIP_VISION_REAL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
CLIP_VISION_CUT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
CLIP_VISION_FIXED = dict(patch_size=14, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_TEXT_REAL = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_TEXT_FIXED = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
CLIP_PROJECTION = 768
CLIP_LOGIT_SCALE_INIT = 2.6592  # ln(1 / 0.07), CLIP's initial temperature
# CLIP's own preprocessing (preprocessor_config.json of the openai/clip-vit-* repositories)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def clip_image_processing(size: int) -> dict:
    """`CLIPImageProcessor` settings of CLIP's preprocessing at `size` px: bicubic resize of
    the shorter side, centre crop, CLIP's mean and std."""
    return dict(do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
                crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


@dataclass(frozen=True)
class ClipRepo:
    """One CLIP ViT-L/14 repository: its Hub id, image size, and the cut sizes of its text
    tower and projection (the vision tower's cut is `CLIP_VISION_CUT` for both)."""

    repo: str
    image_size: int
    text_cut: dict
    projection_cut: int


CLIP_336 = ClipRepo("openai/clip-vit-large-patch14-336", 336,
                    dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2), 32)
CLIP_224 = ClipRepo("openai/clip-vit-large-patch14", 224,
                    dict(hidden_size=768, intermediate_size=256, num_hidden_layers=2, num_attention_heads=12),
                    CLIP_PROJECTION)

README = """# Stand-in for {repo}

Built by `mmpeft.standins` (see `standin.json` for every value that differs from the real
repository). The weights are random; the configuration is CLIP ViT-L/14's at {size} px with
only depth and width cut (image size {size} and patch size 14 kept: {patches} patch tokens and
a class token). `preprocessor_config.json` is CLIP's real preprocessing.

The tokenizer is CLIP's real one: `vocab.json` and `merges.txt` are derived from CLIP's own
merges file (`bpe_simple_vocab_16e6.txt.gz`, taken from the open_clip_torch wheel) the way
CLIP's tokenizer builds them: 49,408 tokens, `<|startoftext|>` 49406, `<|endoftext|>` 49407
(also the padding), texts cut at 77 tokens. Text ids are CLIP's; text features are not,
since the weights are random.
"""


def clip_model(repo: ClipRepo = CLIP_336, full_size: bool = False):
    """The seeded `CLIPModel` of `repo` (float32), its depth and width cut unless `full_size`."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(SEED)
    projection = CLIP_PROJECTION if full_size else repo.projection_cut
    vision = {**sizes(CLIP_VISION_REAL, CLIP_VISION_CUT, full_size), **CLIP_VISION_FIXED,
              "image_size": repo.image_size, "projection_dim": projection}
    text = {**sizes(CLIP_TEXT_REAL, repo.text_cut, full_size), **CLIP_TEXT_FIXED, "projection_dim": projection}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection,
                        logit_scale_init_value=CLIP_LOGIT_SCALE_INIT)
    config.architectures = ["CLIPModel"]
    return CLIPModel(config).eval()


def build_clip(folder: Path, full_size: bool = False, vocab_cache: str | Path | None = None,
               repo: ClipRepo = CLIP_336):
    """`repo`'s layout (`openai/clip-vit-large-patch14-336` by default): `CLIPModel`
    (float32, as published), CLIP's image preprocessing at the repository's size and CLIP's
    tokenizer (merges file from `vocab_cache`, see `clip_vocab.clip_bpe_file`). Returns the
    model, which later builds take apart (LLaVA's vision tower, SD 1.5's text encoder)."""
    from transformers import CLIPImageProcessor

    folder = Path(folder)
    clip = clip_model(repo, full_size)
    clip.save_pretrained(folder)
    CLIPImageProcessor(**clip_image_processing(repo.image_size)).save_pretrained(folder)
    write_clip_tokenizer(folder, vocab_cache)
    (folder / "README.md").write_text(README.format(repo=repo.repo, size=repo.image_size,
                                                    patches=(repo.image_size // 14) ** 2))
    cut = {"vision_config": diff(CLIP_VISION_REAL, CLIP_VISION_CUT),
           "text_config": diff(CLIP_TEXT_REAL, repo.text_cut)}
    if repo.projection_cut != CLIP_PROJECTION:
        cut["projection_dim"] = {"real": CLIP_PROJECTION, "standin": repo.projection_cut}
    record(folder, repo.repo, cut, full_size, SEED, [
        "tokenizer: CLIP's real BPE (vocab.json and merges.txt derived from CLIP's bpe_simple_vocab_16e6.txt.gz)",
        "weights: model.safetensors only (the repository also has them as pytorch_model.bin and in other "
        "frameworks' formats); README.md describes the stand-in, not the model"])
    return clip
