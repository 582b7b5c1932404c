"""Building a MiniGPT-5 model from a preset, and what a run writes and loads back.

An output or checkpoint folder holds the LLaVA files (`save_llava`: connector, the PEFT
adapter with LoRA and the voken rows, processor, `mmpeft_config.json`) plus
`mapper.safetensors`. The frozen bases (LM, CLIP, Stable Diffusion) are named by their
sources in the config, never copied. The config also records where the connector came from
(`connector_from`), so that stage 2 knows whether stage 1 handed it an aligned connector or
a random one, and what the diffusion loss regressed (`prediction_type`), which a reload
checks against the Stable Diffusion it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from mmpeft.families import CONFIG_FILE
from mmpeft.llava.checkpoint import lm_load_kwargs, save_llava
from mmpeft.llava.model import build_llava
from mmpeft.minigpt5.model import LossWeights, MiniGPT5, VokenMapper, scheduler_prediction_type
from mmpeft.models.quant import keep_cpu_4bit_working
from mmpeft.models.tokens import add_tokens
from mmpeft.models.vokens import voken_names


def mapper_settings(llm_hidden: int, pipeline, d_model: int, heads: int, encoder_layers: int, decoder_layers: int,
                    ff: int, input_layers: int = 2) -> dict:
    """The mapper's constructor arguments for the loaded Stable Diffusion: output width
    from the UNet's `cross_attention_dim`, query length from its tokenizer."""
    return {"llm_hidden": llm_hidden, "out_dim": pipeline.unet.config.cross_attention_dim,
            "n_query": pipeline.tokenizer.model_max_length, "d_model": d_model, "heads": heads,
            "encoder_layers": encoder_layers, "decoder_layers": decoder_layers, "ff": ff, "input_layers": input_layers}


def empty_caption(pipeline) -> torch.Tensor:
    """The SD text encoder's encoding of the empty prompt, `(n_query, width)`."""
    ids = pipeline.tokenizer([""], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        return pipeline.text_encoder(ids.to(pipeline.text_encoder.device))[0][0]


def assemble_minigpt5(lm, tokenizer, vision, pipeline, image_token: str, n_vokens: int, connector: str,
                      vision_feature_layer: int):
    """Add `<image>` and the vokens to tokenizer and LM and build the LLaVA model around
    them; returns `(llava, voken_ids)`. The UNet, VAE and text encoder are frozen."""
    ids = add_tokens(tokenizer, lm, [image_token, *voken_names(n_vokens)])
    llava = build_llava(vision, lm, ids[0], connector, vision_feature_layer)
    for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        part.requires_grad_(False).eval()
    return llava, ids[1:]


def training_scheduler(pipeline):
    """The DDPM noise schedule of the pipeline's scheduler config, as SD training uses. It
    keeps the config's `prediction_type` (SD 2.1 at 768 px: `v_prediction`), which sets the
    loss's target; an unsupported one is an error here, before any training."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    scheduler_prediction_type(scheduler)
    return scheduler


STAGE1_FILES = ("mapper.safetensors", "connector.safetensors", "llava_adapter", CONFIG_FILE)


def read_stage1(folder: str | Path) -> dict:
    """The settings a MiniGPT-5 stage-1 output or checkpoint folder recorded; a folder that
    lacks any of its files is an error naming them."""
    folder = Path(folder)
    missing = [f for f in STAGE1_FILES if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(f"model.init_from: {folder} lacks {', '.join(missing)}; give a MiniGPT-5 stage-1 "
                                "output or checkpoint folder, or null to start from scratch")
    return json.loads((folder / CONFIG_FILE).read_text())


def connector_source(source: str) -> Path:
    """What `mmpeft.llava.released.load_connector` reads for `model.init_connector`: a local
    file or folder as given, else the Hub repo of that id (LLaVA's released stage 1, such as
    liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5) with only its
    `connector.safetensors` or `mm_projector.bin` downloaded (the latter is read as tensors
    only, `weights_only=True`)."""
    from mmpeft.hub import is_hub_id
    from mmpeft.llava.released import CONNECTOR_FILE, MM_PROJECTOR_FILE

    if Path(source).exists():
        return Path(source)
    if not is_hub_id(source):
        raise FileNotFoundError(f"model.init_connector: {source} is neither a local file or folder nor a Hub repo id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=[CONNECTOR_FILE, MM_PROJECTOR_FILE]))
    except OSError as err:  # offline, unknown repo, no access
        raise OSError(f"model.init_connector: {source} is no local file or folder, and as a Hub repo it cannot be "
                      f"downloaded: {err}\nOffline, download it on a connected machine (huggingface-cli download "
                      f"{source} {MM_PROJECTOR_FILE}) and give its local folder instead") from err


def minigpt5_settings(recipe: str, preset, mapper_args: dict, config: dict, launch: dict | None = None,
                      connector_from: str | None = None, prediction_type: str | None = None) -> dict:
    """What a run records in `mmpeft_config.json`: base sources, the mapper's arguments,
    the loss settings and the model choices `load_minigpt5` needs, where the connector's
    weights came from (`connector_from`: a LLaVA stage-1 output, released projector or
    stage-1 run; None when it started random), what the diffusion loss regressed
    (`prediction_type` of the training scheduler: `epsilon`, `v_prediction` or `sample`),
    the whole config and how the run was launched."""
    m, loss = config["model"], config["loss"]
    return {"recipe": recipe, "launch": launch, "connector_from": connector_from,
            "sources": {"lm": preset.lm, "clip": preset.clip, "diffusion": preset.diffusion},
            "mapper": mapper_args, "loss_weights": loss["weights"], "cfg_rate": loss["cfg_rate"],
            "snr_gamma": loss["snr_gamma"], "prediction_type": prediction_type, "config": config, **{k: m[k] for k in (
                "connector", "image_token", "n_vokens", "vision_feature_layer", "trainable", "qlora")}}


def save_minigpt5(model: MiniGPT5, folder: str | Path, processor, settings: dict) -> None:
    """Write the LLaVA files and the mapper; `settings` must hold `sources` (lm, clip,
    diffusion), `mapper` (constructor arguments) and what `save_llava` needs."""
    folder = Path(folder)
    save_llava(model.llava, folder, processor, settings)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.mapper.state_dict().items()},
              folder / "mapper.safetensors")


def load_minigpt5(folder: str | Path, lm_source: str | None = None, clip_source: str | None = None,
                  diffusion_source: str | None = None, base_kwargs: dict | None = None,
                  dtype: torch.dtype = torch.float32):
    """Rebuild a trained MiniGPT-5 from an output or checkpoint folder in one call; returns
    `(model, processor, pipeline, settings)` with the model in eval mode. Base models come
    from the recorded sources unless a local copy is given; `base_kwargs` go to the LM's
    and CLIP's `from_pretrained`. Every part is in `dtype`, not in the dtype each base was
    published in (Vicuna's float16 next to CLIP's and Stable Diffusion's float32): the LM's
    hidden states feed the mapper, the mapper's output the UNet; a QLoRA run's parts are in
    the compute dtype it trained with.
    A Stable Diffusion whose scheduler predicts another target than the run recorded
    (`prediction_type`) is an error: the mapper learned to condition that target."""
    from transformers import AutoModelForCausalLM, CLIPModel, LlavaProcessor

    from mmpeft.models.diffusion import stable_diffusion_pipeline_class

    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / "mapper.safetensors").exists():
        raise FileNotFoundError(f"{folder} is not a MiniGPT-5 output or checkpoint folder "
                                f"(needs {CONFIG_FILE} and mapper.safetensors)")
    settings = json.loads((folder / CONFIG_FILE).read_text())
    src = settings["sources"]
    processor = LlavaProcessor.from_pretrained(folder)
    base_kwargs = base_kwargs or {}
    lm_kwargs, dtype = lm_load_kwargs(settings, {}, dtype)  # a QLoRA run: 4 bits, its compute dtype
    lm = AutoModelForCausalLM.from_pretrained(lm_source or src["lm"], **base_kwargs, **lm_kwargs)
    keep_cpu_4bit_working(lm)
    vision = CLIPModel.from_pretrained(clip_source or src["clip"], **base_kwargs, dtype=dtype).vision_model
    pipeline = stable_diffusion_pipeline_class().from_pretrained(
        diffusion_source or src["diffusion"], safety_checker=None, requires_safety_checker=False, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    noise_scheduler = training_scheduler(pipeline)
    recorded, found = settings.get("prediction_type"), scheduler_prediction_type(noise_scheduler)
    if recorded and recorded != found:
        raise ValueError(f"{folder} trained against the {recorded} target, but the Stable Diffusion at "
                         f"{diffusion_source or src['diffusion']} predicts {found}; give the diffusion model it "
                         "trained with")
    llava, voken_ids = assemble_minigpt5(lm, processor.tokenizer, vision, pipeline, settings["image_token"],
                                         settings["n_vokens"], settings["connector"],
                                         settings.get("vision_feature_layer", -2))
    llava.model.multi_modal_projector.load_state_dict(load_file(folder / "connector.safetensors"))
    if (folder / "llava_adapter").is_dir():
        llava = PeftModel.from_pretrained(llava, folder / "llava_adapter")
    mapper = VokenMapper(**settings["mapper"])
    mapper.load_state_dict(load_file(folder / "mapper.safetensors"))
    model = MiniGPT5(llava, mapper.to(dtype), pipeline.unet, noise_scheduler, voken_ids, empty_caption(pipeline),
                     LossWeights(**settings["loss_weights"]), settings["cfg_rate"], settings["snr_gamma"])
    return model.eval(), processor, pipeline, settings
