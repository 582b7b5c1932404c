"""Stable Diffusion 2.1-base, 2.1 (v-prediction) and 1.5 stand-ins, and CLIP ViT-L/14 at
224 px: the Hub layouts, the real configs but depth and width, loadable offline by diffusers
and mmpeft's loaders, and usable for a training loss and for drawing."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from transformers import CLIPModel, CLIPTextModel

from mmpeft.minigpt5.checkpoint import training_scheduler
from mmpeft.minigpt5.model import latent_diffusion_loss, scheduler_prediction_type
from mmpeft.presets import load_clip, load_diffusion, resolve_preset
from mmpeft.standins.build import STANDINS, build_standins
from mmpeft.standins.clip import CLIP_224, CLIP_MEAN, CLIP_STD, clip_model
from mmpeft.standins.diffusion import (
    SD15,
    SD21_BASE,
    SD21_V,
    safety_checker_from_clip,
    text_encoder_config,
    unet_config,
    vae_config,
)

SD = ("sd21_base", "sd21_v", "sd15")
PIPELINE_FILES = {
    "README.md", "standin.json", "model_index.json", "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors"}
# what the real repositories' configs say, by stand-in: UNet, VAE, text encoder, scheduler, tokenizer
REAL = {
    "sd21_base": dict(sample_size=64, cross_attention_dim=1024, use_linear_projection=True, upcast_attention=False,
                      vae_sample_size=768, text=(1024, 512, "gelu", 16, 23), scheduler="PNDMScheduler",
                      prediction_type="epsilon", pad=("!", 0), repo="stabilityai/stable-diffusion-2-1-base"),
    "sd21_v": dict(sample_size=96, cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True,
                   vae_sample_size=768, text=(1024, 512, "gelu", 16, 23), scheduler="DDIMScheduler",
                   prediction_type="v_prediction", pad=("!", 0), repo="stabilityai/stable-diffusion-2-1"),
    "sd15": dict(sample_size=64, cross_attention_dim=768, use_linear_projection=False, upcast_attention=False,
                 vae_sample_size=512, text=(768, 768, "quick_gelu", 12, 12), scheduler="PNDMScheduler",
                 prediction_type="epsilon", pad=("<|endoftext|>", 49407),
                 repo="stable-diffusion-v1-5/stable-diffusion-v1-5"),
}
CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids for "a photo of a cat"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    wanted = {"clip224", *SD}
    return build_standins(tmp_path_factory.mktemp("standins"), standins=tuple(s for s in STANDINS if s.key in wanted))


@pytest.fixture(scope="module")
def pipelines(folders):
    return {key: StableDiffusionPipeline.from_pretrained(folders[key], local_files_only=True) for key in SD}


def _files(folder):
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_folders_have_the_hub_repositories_layout(folders):
    assert {k: str(v.relative_to(v.parents[1])) for k, v in folders.items()} == {
        "clip224": "openai/clip-vit-large-patch14", **{k: REAL[k]["repo"] for k in SD}}
    assert _files(folders["sd21_base"]) == _files(folders["sd21_v"]) == PIPELINE_FILES
    checker = {"safety_checker/config.json", "safety_checker/model.safetensors"}
    assert _files(folders["sd15"]) == PIPELINE_FILES | checker
    assert _files(folders["clip224"]) == {
        "README.md", "standin.json", "config.json", "model.safetensors", "preprocessor_config.json", "merges.txt",
        "vocab.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    for key in SD:
        index = json.loads((folders[key] / "model_index.json").read_text())
        assert index["scheduler"] == ["diffusers", REAL[key]["scheduler"]]
        assert (index["unet"], index["vae"], index["text_encoder"], index["tokenizer"], index["feature_extractor"]) == (
            ["diffusers", "UNet2DConditionModel"], ["diffusers", "AutoencoderKL"], ["transformers", "CLIPTextModel"],
            ["transformers", "CLIPTokenizer"], ["transformers", "CLIPImageProcessor"])
    assert json.loads((folders["sd15"] / "model_index.json").read_text())["safety_checker"] == [
        "stable_diffusion", "StableDiffusionSafetyChecker"]
    sd21 = json.loads((folders["sd21_base"] / "model_index.json").read_text())
    assert sd21["safety_checker"] == [None, None] and sd21["requires_safety_checker"] is False


@pytest.mark.parametrize("key", SD)
def test_configs_keep_the_real_values_but_depth_and_width(pipelines, folders, key):
    real, pipe = REAL[key], pipelines[key]
    unet, vae, text = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    assert (unet.sample_size, unet.cross_attention_dim, unet.use_linear_projection, unet.upcast_attention) == (
        real["sample_size"], real["cross_attention_dim"], real["use_linear_projection"], real["upcast_attention"])
    assert (unet.in_channels, unet.out_channels, unet.norm_num_groups, len(unet.block_out_channels)) == (4, 4, 32, 4)
    assert unet.down_block_types[-1] == "DownBlock2D" and unet.up_block_types[0] == "UpBlock2D"
    assert (vae.latent_channels, vae.scaling_factor, vae.sample_size, pipe.vae_scale_factor) == (
        4, 0.18215, real["vae_sample_size"], 8)
    hidden, projection, act, heads, layers = real["text"]
    assert (text.hidden_size, text.projection_dim, text.hidden_act, text.num_attention_heads) == (
        hidden, projection, act, heads)
    assert (text.vocab_size, text.max_position_embeddings, text.bos_token_id, text.eos_token_id) == (49408, 77, 0, 2)
    assert (type(pipe.scheduler).__name__, scheduler_prediction_type(pipe.scheduler)) == (
        real["scheduler"], real["prediction_type"])
    schedule = json.loads((folders[key] / "scheduler" / "scheduler_config.json").read_text())
    schedule.pop("_diffusers_version")
    prediction = {} if key == "sd15" else {"prediction_type": real["prediction_type"]}  # SD 1.5's file has none
    assert schedule == {"_class_name": real["scheduler"], "beta_end": 0.012, "beta_schedule": "scaled_linear",
                        "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                        **prediction}
    assert (pipe.tokenizer.pad_token, pipe.tokenizer.pad_token_id) == real["pad"]
    assert pipe.tokenizer("a photo of a cat").input_ids == CAT and pipe.tokenizer.model_max_length == 77
    assert pipe.feature_extractor.crop_size == {"height": 224, "width": 224}
    record = json.loads((folders[key] / "standin.json").read_text())
    assert record["stands_in_for"] == real["repo"] and record["seed"] == 0 and not record["full_size"]
    assert record["cut"]["unet"]["block_out_channels"]["real"] == [320, 640, 1280, 1280]
    assert record["cut"]["vae"]["block_out_channels"]["real"] == [128, 256, 512, 512]
    assert record["cut"]["text_encoder"]["num_hidden_layers"] == {"real": layers, "standin": text.num_hidden_layers}


def test_mmpeft_loaders_read_the_folders_offline_with_their_weights(folders):
    minigpt5 = load_diffusion(resolve_preset("minigpt5", diffusion=str(folders["sd21_base"])), local_files_only=True)
    gill = load_diffusion(resolve_preset("gill", diffusion=str(folders["sd15"])), local_files_only=True)
    assert type(minigpt5).__name__ == type(gill).__name__ == "StableDiffusionPipeline"
    assert minigpt5.safety_checker is None and type(gill.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    # the files carry the Hub's tensor names (transformers 4's nesting); every one is read, none left random
    with safe_open(folders["sd21_base"] / "text_encoder" / "model.safetensors", "pt") as f:
        assert all(name.startswith("text_model.") for name in f.keys())
        embedding = f.get_tensor("text_model.embeddings.token_embedding.weight")
    assert torch.equal(minigpt5.text_encoder.get_input_embeddings().weight, embedding)
    with safe_open(folders["sd15"] / "safety_checker" / "model.safetensors", "pt") as f:
        patches = f.get_tensor("vision_model.vision_model.embeddings.patch_embedding.weight")
    assert torch.equal(gill.safety_checker.vision_model.embeddings.patch_embedding.weight, patches)


def test_sd15_text_encoder_and_safety_checker_are_the_clip_vit_l14_standins(pipelines, folders):
    clip = CLIPModel.from_pretrained(folders["clip224"])
    text_encoder, checker = pipelines["sd15"].text_encoder, pipelines["sd15"].safety_checker
    for name, tensor in clip.text_model.state_dict().items():
        assert torch.equal(text_encoder.state_dict()[name], tensor), name
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(checker.vision_model.state_dict()[name], tensor), name
    assert torch.equal(checker.visual_projection.weight, clip.visual_projection.weight)
    assert torch.equal(checker.concept_embeds, torch.ones(17, 768))
    # the SD 2.1 pair share their text encoder, as the real ones share OpenCLIP-ViT/H's tower
    assert torch.equal(pipelines["sd21_base"].text_encoder.get_input_embeddings().weight,
                       pipelines["sd21_v"].text_encoder.get_input_embeddings().weight)


@pytest.mark.parametrize("key", SD)
def test_unet_takes_the_text_encoders_output_and_vae_latents(pipelines, key):
    pipe = pipelines[key]
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        condition = pipe.text_encoder(ids)[0]
        latents = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
        out = pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=condition).sample
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    assert condition.shape == (1, 77, REAL[key]["cross_attention_dim"])
    assert latents.shape == out.shape == (1, 4, 8, 8) and decoded.shape == (1, 3, 64, 64)


def test_v_prediction_standin_trains_against_the_velocity(pipelines):
    pipe = pipelines["sd21_v"]
    scheduler = training_scheduler(pipe)
    assert scheduler.config.prediction_type == "v_prediction"
    gen = torch.Generator().manual_seed(0)
    latents, condition = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 1024, generator=gen)
    torch.manual_seed(1)
    loss = latent_diffusion_loss(pipe.unet, scheduler, latents, condition, snr_gamma=None)
    torch.manual_seed(1)  # the noise and timesteps the loss drew
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (2,))
    with torch.no_grad():
        pred = pipe.unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=condition).sample
    velocity = scheduler.get_velocity(latents, noise, t)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, velocity))
    assert abs(loss - torch.nn.functional.mse_loss(pred, noise)) > 1e-3
    assert scheduler_prediction_type(training_scheduler(pipelines["sd21_base"])) == "epsilon"


@pytest.mark.parametrize("key", SD)
def test_two_step_pipeline_call_draws_an_image(pipelines, key):
    out = pipelines[key]("a photo of a cat", num_inference_steps=2, height=64, width=64,
                         generator=torch.Generator().manual_seed(0))
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (64, 64)
    assert out.nsfw_content_detected == ([False] if key == "sd15" else None)


def test_clip_vit_l14_standin_gives_257_tokens_at_224_with_clips_preprocessing(folders):
    clip, processor = load_clip(resolve_preset("gill", clip=str(folders["clip224"])), log=lambda _: None)
    vision, text = clip.config.vision_config, clip.config.text_config
    assert (vision.image_size, vision.patch_size, vision.hidden_act, clip.config.projection_dim) == (
        224, 14, "quick_gelu", 768)
    assert (text.hidden_size, text.vocab_size, text.max_position_embeddings) == (768, 49408, 77)
    pixels = processor(images=Image.new("RGB", (300, 200), (128, 64, 255)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)
    expected = [(v / 255 - m) / s for v, m, s in zip((128, 64, 255), CLIP_MEAN, CLIP_STD, strict=True)]
    torch.testing.assert_close(pixels[0, :, 50, 50], torch.tensor(expected), rtol=0, atol=1e-5)
    with torch.no_grad():
        assert clip.vision_model(pixel_values=pixels).last_hidden_state.shape == (1, 257, vision.hidden_size)
        assert clip.get_image_features(pixel_values=pixels).pooler_output.shape == (1, 768)
    assert processor.tokenizer("a photo of a cat").input_ids == CAT
    assert processor.tokenizer.pad_token_id == 49407
    cut = json.loads((folders["clip224"] / "standin.json").read_text())["cut"]
    assert cut["vision_config"]["num_hidden_layers"] == {"real": 24, "standin": vision.num_hidden_layers}
    assert "projection_dim" not in cut and "hidden_size" not in cut["text_config"]


def test_full_size_configs_have_the_published_parameter_counts():
    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):  # the real sizes, without memory
        assert count(UNet2DConditionModel(**unet_config(SD21_BASE, full_size=True))) == 865_910_724
        assert count(UNet2DConditionModel(**unet_config(SD21_V, full_size=True))) == 865_910_724
        assert count(UNet2DConditionModel(**unet_config(SD15, full_size=True))) == 859_520_964
        assert count(AutoencoderKL(**vae_config(SD15, full_size=True))) == 83_653_863
        assert count(CLIPTextModel(text_encoder_config(SD21_BASE, full_size=True))) == 340_387_840
        assert count(CLIPTextModel(text_encoder_config(SD15, full_size=True))) == 123_060_480
        clip = clip_model(CLIP_224, full_size=True)
        assert count(clip) == 427_616_513
        # SD 1.5's parts from it: 303,981,588 float32 numbers fill the published 1.216 GB safety_checker file
        assert count(safety_checker_from_clip(clip)) == 303_981_588
        CLIPTextModel(text_encoder_config(SD15, full_size=True)).load_state_dict(clip.text_model.state_dict())
