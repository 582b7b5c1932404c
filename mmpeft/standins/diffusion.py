"""Stand-ins for the Stable Diffusion repositories the recipes load, as
`StableDiffusionPipeline` folders laid out as the Hub repositories are:

    stabilityai/stable-diffusion-2-1-base          MiniGPT-5's: 512 px, epsilon prediction
    stabilityai/stable-diffusion-2-1               768 px, v-prediction (DDIM scheduler)
    stable-diffusion-v1-5/stable-diffusion-v1-5    GILL's: 512 px, epsilon, with safety checker

Each has `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` and
`feature_extractor/` (SD 1.5 also `safety_checker/`). The configs are the real ones with only
depth and width cut: the VAE keeps 4 latent channels, 4 levels (8x downsampling) and the
scaling factor 0.18215; the UNet keeps its sample size and cross-attention width (1,024 for
SD 2.x, 768 for SD 1.5) and the text encoder its hidden width and projection, so conditions
built for the real models have the real shapes; the scheduler configs are the real files.
Weights are random and seeded, float32 as published; the tokenizers are CLIP's real BPE.
SD 1.5's text encoder and safety checker are taken from the `openai/clip-vit-large-patch14`
stand-in (`clip.CLIP_224`), as the real ones are CLIP ViT-L/14's towers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mmpeft.standins.clip import (
    CLIP_224,
    CLIP_TEXT_REAL,
    CLIP_VISION_CUT,
    CLIP_VISION_REAL,
    clip_image_processing,
    clip_model,
)
from mmpeft.standins.clip_vocab import EOS, write_clip_tokenizer
from mmpeft.standins.record import diff, record, sizes

SEED = 0

# unet/config.json, the same in all three repositories but for the values in StableDiffusionRepo
UNET_REAL = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
UNET_CUT = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1)
UNET_FIXED = dict(
    in_channels=4, out_channels=4, act_fn="silu", center_input_sample=False, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    dual_cross_attention=False, only_cross_attention=False, num_class_embeds=None)
# vae/config.json (all three): 4 levels, so 8x downsampling, into 4 latent channels
VAE_REAL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
VAE_CUT = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1)
VAE_FIXED = dict(in_channels=3, out_channels=3, latent_channels=4, act_fn="silu", norm_num_groups=32,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 scaling_factor=0.18215)
VAE_SCALE = 2 ** (len(VAE_REAL["block_out_channels"]) - 1)  # 8: a 512 px image has 64 x 64 latents
# text_encoder/config.json of stabilityai/stable-diffusion-2-1{,-base}: OpenCLIP ViT-H/14's text
# tower without its last layer (23 of 24)
OPENCLIP_H_TEXT_REAL = dict(num_hidden_layers=23, intermediate_size=4096)
OPENCLIP_H_TEXT_CUT = dict(num_hidden_layers=2, intermediate_size=256)
SD_TEXT_FIXED = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0,
                     eos_token_id=2, pad_token_id=1, attention_dropout=0.0, dropout=0.0, initializer_range=0.02,
                     initializer_factor=1.0)
OPENCLIP_H_TEXT_FIXED = dict(hidden_size=1024, num_attention_heads=16, hidden_act="gelu", projection_dim=512)
# scheduler/scheduler_config.json: SD's scaled-linear beta schedule over 1,000 steps
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                trained_betas=None, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False)
# feature_extractor/preprocessor_config.json: CLIP's preprocessing at 224, for the safety checker
FEATURE_EXTRACTOR_SIZE = 224


@dataclass(frozen=True)
class StableDiffusionRepo:
    """What one Stable Diffusion repository has of its own: the UNet's real and cut sizes and
    its other values, the VAE's sample size, the scheduler's class and config file, the text
    encoder's real and cut sizes and its other values, the tokenizer's pad token and whether
    the pipeline has a safety checker."""

    repo: str
    unet_real: dict
    unet_cut: dict
    unet_fixed: dict
    vae_sample_size: int
    scheduler: str
    scheduler_config: dict
    text_real: dict
    text_cut: dict
    text_fixed: dict
    pad_token: str
    safety_checker: bool


SD21_BASE = StableDiffusionRepo(
    "stabilityai/stable-diffusion-2-1-base",
    # attention_head_dim is the number of heads per level here (diffusers' name; 64 wide each)
    {**UNET_REAL, "attention_head_dim": (5, 10, 20, 20)}, {**UNET_CUT, "attention_head_dim": (2, 4, 8, 8)},
    dict(sample_size=64, cross_attention_dim=1024, use_linear_projection=True, upcast_attention=False),
    768,  # the published vae/config.json says 768 in the 512 px repository too
    "PNDMScheduler", {**SD_BETAS, "prediction_type": "epsilon"},
    OPENCLIP_H_TEXT_REAL, OPENCLIP_H_TEXT_CUT, {**SD_TEXT_FIXED, **OPENCLIP_H_TEXT_FIXED},
    "!", False)
SD21_V = StableDiffusionRepo(
    "stabilityai/stable-diffusion-2-1", SD21_BASE.unet_real, SD21_BASE.unet_cut,
    dict(SD21_BASE.unet_fixed, sample_size=96, upcast_attention=True), 768,
    "DDIMScheduler", {**SD_BETAS, "prediction_type": "v_prediction"},
    SD21_BASE.text_real, SD21_BASE.text_cut, SD21_BASE.text_fixed, "!", False)
SD15 = StableDiffusionRepo(
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    {**UNET_REAL, "attention_head_dim": 8}, {**UNET_CUT, "attention_head_dim": 2},
    dict(sample_size=64, cross_attention_dim=768, use_linear_projection=False, upcast_attention=False), 512,
    "PNDMScheduler", SD_BETAS,  # no prediction_type in SD 1.5's file: epsilon
    CLIP_TEXT_REAL, CLIP_224.text_cut,
    {**SD_TEXT_FIXED, "hidden_act": "quick_gelu", "projection_dim": 768}, EOS, True)

README = """# Stand-in for {repo}

Built by `mmpeft.standins` (see `standin.json` for every value that differs from the real
repository): a `StableDiffusionPipeline` folder laid out as the real one, its configs the real
ones with only depth and width cut, random weights. The VAE keeps 4 latent channels, 8x
downsampling and the scaling factor 0.18215; the UNet keeps its sample size ({size} px) and
cross-attention width ({width}); the scheduler is the real one ({scheduler}, {prediction}).
The tokenizer is CLIP's real BPE. Images it draws are noise.
"""


def unet_config(spec: StableDiffusionRepo, full_size: bool = False) -> dict:
    """Arguments of the `UNet2DConditionModel` of `spec` (cut unless `full_size`)."""
    return {**UNET_FIXED, **spec.unet_fixed, **sizes(spec.unet_real, spec.unet_cut, full_size)}


def vae_config(spec: StableDiffusionRepo, full_size: bool = False) -> dict:
    """Arguments of the `AutoencoderKL` of `spec` (cut unless `full_size`)."""
    return {**VAE_FIXED, **sizes(VAE_REAL, VAE_CUT, full_size), "sample_size": spec.vae_sample_size}


def text_encoder_config(spec: StableDiffusionRepo, full_size: bool = False):
    """The `CLIPTextConfig` of the text encoder of `spec` (cut unless `full_size`)."""
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(**spec.text_fixed, **sizes(spec.text_real, spec.text_cut, full_size))
    config.architectures = ["CLIPTextModel"]
    return config


def build_stable_diffusion(folder: Path, spec: StableDiffusionRepo, full_size: bool = False,
                           vocab_cache: str | Path | None = None, clip=None) -> None:
    """Write the stand-in of `spec` into `folder`. For SD 1.5, `clip` is the
    `openai/clip-vit-large-patch14` stand-in's `CLIPModel` (same `full_size`) whose text
    tower becomes the text encoder and whose vision tower the safety checker's; it is built
    here when not given. The tokenizer's merges file comes from `vocab_cache`."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(SEED)
    UNet2DConditionModel(**unet_config(spec, full_size)).save_pretrained(folder / "unet")
    torch.manual_seed(SEED)
    AutoencoderKL(**vae_config(spec, full_size)).save_pretrained(folder / "vae")
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(text_encoder_config(spec, full_size)).eval()
    cut = {"unet": diff(spec.unet_real, spec.unet_cut), "vae": diff(VAE_REAL, VAE_CUT),
           "text_encoder": diff(spec.text_real, spec.text_cut)}
    notes = [
        "weights: random, float32, only as diffusion_pytorch_model.safetensors / model.safetensors (the repository "
        "also has .bin copies, fp16 variants and the original single-file checkpoints at its top level); "
        "README.md describes the stand-in, not the model",
        f"tokenizer: CLIP's real BPE, padding with {spec.pad_token!r} as the repository's special_tokens_map.json "
        "sets it; no tokenizer.json, as in the repository",
        f"config files: written by diffusers {diffusers.__version__} and transformers {transformers.__version__}, so "
        "they spell out defaults the published files leave implicit and name those versions"]
    if spec.safety_checker:
        clip = clip if clip is not None else clip_model(CLIP_224, full_size)
        text_encoder.load_state_dict(clip.text_model.state_dict())
        safety_checker_from_clip(clip).save_pretrained(folder / "safety_checker")
        _hub_names(folder / "safety_checker" / "model.safetensors", "vision_model.", "vision_model.vision_model.")
        cut["safety_checker"] = {"vision_config": diff(CLIP_VISION_REAL, CLIP_VISION_CUT)}
        notes += [
            "text_encoder: the openai/clip-vit-large-patch14 stand-in's text tower (the same weights), as SD 1.5's "
            "text encoder is CLIP ViT-L/14's",
            "safety_checker: the openai/clip-vit-large-patch14 stand-in's vision tower and projection; its 17 + 3 "
            "concept embeddings and thresholds keep diffusers' initial ones (all ones), so no cosine exceeds a "
            "threshold and no image is blacked out (the real ones hold CLIP embeddings of unsafe concepts)"]
    text_encoder.save_pretrained(folder / "text_encoder")
    _hub_names(folder / "text_encoder" / "model.safetensors", "", "text_model.")
    write_clip_tokenizer(folder / "tokenizer", vocab_cache, pad_token=spec.pad_token, tokenizer_json=False)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": spec.scheduler, "_diffusers_version": diffusers.__version__, **spec.scheduler_config},
        indent=2, sort_keys=True) + "\n")
    CLIPImageProcessor(**clip_image_processing(FEATURE_EXTRACTOR_SIZE)).save_pretrained(folder / "feature_extractor")
    (folder / "model_index.json").write_text(json.dumps(_model_index(spec, diffusers.__version__), indent=2) + "\n")
    (folder / "README.md").write_text(README.format(
        repo=spec.repo, size=spec.unet_fixed["sample_size"] * VAE_SCALE, width=spec.unet_fixed["cross_attention_dim"],
        scheduler=spec.scheduler, prediction=spec.scheduler_config.get("prediction_type", "epsilon")))
    record(folder, spec.repo, cut, full_size, SEED, notes)


def safety_checker_from_clip(clip):
    """diffusers' `StableDiffusionSafetyChecker` on the CLIP stand-in's vision tower and
    projection (the checker's real config: CLIP ViT-L/14 at 224, projection 768)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(text_config=clip.config.text_config.to_dict(),
                        vision_config=clip.config.vision_config.to_dict(), projection_dim=clip.config.projection_dim)
    config.architectures = ["StableDiffusionSafetyChecker"]
    checker = StableDiffusionSafetyChecker(config).eval()
    checker.vision_model.load_state_dict(clip.vision_model.state_dict())
    checker.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return checker


def _hub_names(path: Path, prefix: str, hub_prefix: str) -> None:
    """Rename the tensors of the safetensors file at `path` from `prefix...` to
    `hub_prefix...`: transformers 5 saves CLIP towers without the nesting of transformers 4,
    whose names the Hub's files have (and transformers 5 reads, as it reads the real ones)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({hub_prefix + k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}, path,
              metadata={"format": "pt"})


def _model_index(spec: StableDiffusionRepo, version: str) -> dict:
    """model_index.json as the repository has it (SD 2.x: no safety checker, and says so)."""
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": version,
             "feature_extractor": ["transformers", "CLIPImageProcessor"]}
    if not spec.safety_checker:
        index["requires_safety_checker"] = False
    index |= {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"] if spec.safety_checker
              else [None, None],
              "scheduler": ["diffusers", spec.scheduler], "text_encoder": ["transformers", "CLIPTextModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"]}
    return index
