"""MiniGPT-5 stage 1, unimodal alignment: the LM learns to answer a caption with the vokens,
and the feature mapper learns to turn their hidden states into Stable Diffusion's
conditioning, on caption pairs.

    deepspeed recipes/minigpt5_stage1.py                                  # tiny preset, tiny world, CPU
    deepspeed recipes/minigpt5_stage1.py data.train.format=caption_jsonl data.train.path=pairs.jsonl \\
        data.train.image_folder=images/
    deepspeed recipes/minigpt5_stage1.py --config recipes/configs/minigpt5_stage1_vicuna.yaml
    deepspeed recipes/minigpt5_stage1.py --push_to_hub --hub_model_id you/minigpt5-stage1  # push when the run ends

Trains: the vokens' rows of the LM's input embeddings and output head, the whole mapper
(MLP, learned query, transformer) at its own learning rate. Frozen, and in eval mode: every
other LM weight, CLIP, the connector, Stable Diffusion (its UNet passes the diffusion loss's
gradient back). Stage 1 shows no images; the connector in `model.init_connector` (a LLaVA
stage-1 output, a folder with LLaVA's released `mm_projector.bin`, or its Hub id) is carried
into the run's folder for stage 2, which reads its context images through it. Stops at
start-up when a frozen mapper part would stay random.
Loss: 0.01 LM + latent diffusion (Min-SNR 5) + 0.1 caption alignment, with 10% CFG dropout;
the diffusion term regresses what the UNet's scheduler predicts (SD 2.1-base: the noise; SD 2.1
at 768 px: the velocity), named in the start-up log and recorded as `prediction_type`.
Writes to `training.output_dir`: the LLaVA files (`llava_adapter/` holds the voken rows,
`connector.safetensors`, processor, `mmpeft_config.json` with `connector_from` and
`prediction_type`), `mapper.safetensors`, `checkpoint-{step}/`, `metrics.json` (with the
records skipped, by reason, under "skipped"), `metrics.jsonl`, `training.png`.
"""

import json
import os
from pathlib import Path

import torch

from mmpeft.data.conversation import ConversationEncoder
from mmpeft.data.diffusion_targets import CaptionTargets, LatentTargets, prepare_targets, sd_resolution
from mmpeft.data.readers import read_caption_jsonl, read_caption_shards
from mmpeft.data.stories import VokenDataset, VokenSample, caption_voken_sample, check_caption_fit, collate_vokens
from mmpeft.data.templates import chat_template
from mmpeft.hub import push
from mmpeft.llava.model import llava_parts, llava_processor, load_base_models
from mmpeft.llava.released import load_connector
from mmpeft.minigpt5.checkpoint import (
    assemble_minigpt5,
    connector_source,
    empty_caption,
    load_minigpt5,
    mapper_settings,
    minigpt5_settings,
    save_minigpt5,
    training_scheduler,
)
from mmpeft.minigpt5.evaluation import conditioning_gap, mapped_conditions
from mmpeft.minigpt5.model import (
    PREDICTION_TARGETS,
    LossWeights,
    MiniGPT5,
    VokenMapper,
    mapper_parts,
    scheduler_prediction_type,
)
from mmpeft.models.trainable import (
    LoraSettings,
    PartOrigin,
    apply_trainability,
    check_frozen_parts_loaded,
    frozen_modules,
    trainable_parameter_count,
)
from mmpeft.models.vokens import trainable_token_targets
from mmpeft.presets import load_diffusion, resolve_preset
from mmpeft.start import launch_record, run_recipe, start_recipe
from mmpeft.train.loop import TrainConfig, train, training_dtype
from mmpeft.train.placement import rank_device

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "minigpt5_stage1_tiny.yaml"


def read_pairs(source: dict, prompt: str, n_vokens: int):
    if source["format"] == "caption_shards":
        pairs = read_caption_shards(source["path"])
    elif source["format"] == "caption_jsonl":
        pairs = read_caption_jsonl(source["path"], source["image_folder"])
    else:
        raise ValueError(f"data format must be caption_shards or caption_jsonl, not {source['format']!r}")
    return [VokenSample(p, [], []) if p.problem else  # a reader's bad record, for the dataset to judge
            caption_voken_sample(p.id, p.images[0], p.messages[-1]["content"], prompt, n_vokens) for p in pairs]


def main(argv=None):
    args, cfg, zoo, rank, log = start_recipe(__doc__, DEFAULT_CONFIG, argv, os.environ)
    m, d, t, loss = cfg["model"], cfg["data"], cfg["training"], cfg["loss"]

    ##### start-up checks, before any model loads: stage 1 builds the mapper afresh
    check_frozen_parts_loaded([PartOrigin(f"mapper.{part}", f"model.mapper_trainable.{part}", how == "frozen", None, "")
                               for part, how in m["mapper_trainable"].items()], m.get("allow_random_frozen", []))
    connector_from = connector_source(m["init_connector"]) if m["init_connector"] else None

    ##### model
    preset = resolve_preset(m["preset"], zoo_dir=zoo, lm=m.get("lm_path"), clip=m.get("clip_path"),
                            diffusion=m.get("diffusion_path"))
    dtype = training_dtype(t)
    lm, tokenizer, vision, image_processor = load_base_models(preset, qlora=m["qlora"], dtype=dtype,
                                                              attn_implementation=m["attn_implementation"])
    pipeline = load_diffusion(preset, dtype=dtype)
    torch.manual_seed(t["seed"])
    llava, voken_ids = assemble_minigpt5(lm, tokenizer, vision, pipeline, m["image_token"], m["n_vokens"],
                                         m["connector"], m["vision_feature_layer"])
    if connector_from:  # stage 1 has no input images; the connector is carried on to stage 2
        read = load_connector(llava.model.multi_modal_projector, connector_from, m["connector"])
        log(f"connector: from {m['init_connector']} ({read.name}), carried on to stage 2")
    else:
        log("connector: random (no model.init_connector); stage 2 must train it or be given one")
    image_seq_length = llava.config.image_seq_length
    rows = {name: voken_ids for name in trainable_token_targets(llava).values()}
    parts = llava_parts(llava)
    llava = apply_trainability(llava, parts, m["trainable"], LoraSettings(**m["lora"]), token_rows=rows)
    mapper_args = mapper_settings(lm.config.hidden_size, pipeline, **m["mapper"])
    mapper = VokenMapper(**mapper_args).to(dtype)
    for part, module in mapper_parts(mapper).items():
        module.requires_grad_(m["mapper_trainable"][part] == "full")
    frozen = [*frozen_modules(parts, m["trainable"]), *frozen_modules(mapper_parts(mapper), m["mapper_trainable"]),
              pipeline.unet, pipeline.vae, pipeline.text_encoder]
    noise_scheduler = training_scheduler(pipeline)
    prediction_type = scheduler_prediction_type(noise_scheduler)
    log(f"diffusion: {preset.diffusion} at {sd_resolution(pipeline)} px; the loss regresses the "
        f"{PREDICTION_TARGETS[prediction_type]} (prediction_type {prediction_type})")
    model = MiniGPT5(llava, mapper, pipeline.unet, noise_scheduler, voken_ids, empty_caption(pipeline),
                     LossWeights(**loss["weights"]), loss["cfg_rate"], loss["snr_gamma"])
    trainable, total = trainable_parameter_count(model)
    log(f"model: {total:,} parameters, {trainable:,} trainable (voken rows, mapper {m['mapper_trainable']})")

    ##### data
    encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, d["conversation_format"]),
                                  m["image_token"], image_seq_length, d["max_length"])
    check_caption_fit(encoder, voken_ids, d["prompt"])
    samples = read_pairs(d["train"], d["prompt"], m["n_vokens"])
    latents = LatentTargets(pipeline.vae, sd_resolution(pipeline), d["target_cache"])
    captions = CaptionTargets(pipeline.tokenizer, pipeline.text_encoder, d["target_cache"])
    dataset = VokenDataset(samples, encoder, voken_ids, latents, captions, d["skip_bad_records"])
    prepare_targets(latents, [s.targets[0] for s in dataset.items], log=log)  # the records kept, images checked
    prepare_targets(captions, [s.captions[0] for s in dataset.items], log=log)
    log(f"data: {len(dataset)} caption pairs from {d['train']['path']}; "
        + (dataset.skip_report() or "no record skipped"))

    ##### training
    processor = llava_processor(image_processor, tokenizer, vision.config, m["image_token"])
    settings = minigpt5_settings("minigpt5_stage1", preset, mapper_args, cfg, launch_record(__file__, argv),
                                 connector_from=m["init_connector"], prediction_type=prediction_type)

    def export(folder, is_main):
        if is_main:
            save_minigpt5(model, folder, processor, settings)

    history = train(model, dataset, collate_vokens(tokenizer.pad_token_id), TrainConfig(**t),
                    forward=lambda engine, batch: engine(**batch), export=export,
                    lengths=dataset.lengths, has_image=dataset.has_image, resume=args.resume, log=log,
                    frozen=frozen, run_config=cfg)

    ##### evaluation: held-out pairs, the model as saved
    if rank == 0:
        metrics = {k: history[-1][k] for k in history[-1] if k.endswith("loss")}
        metrics["first_loss"] = history[0]["loss"]
        metrics["skipped"] = dict(dataset.skipped)
        e = cfg["eval"]
        if e["pairs"]:
            device = rank_device()  # evaluation runs on this rank's accelerator
            trained = load_minigpt5(t["output_dir"], dtype=dtype)[0].to(device)
            pipeline.vae.to(device)  # encodes the held-out targets
            held_out = read_pairs(e["pairs"], d["prompt"], m["n_vokens"])[: e["limit"]]
            test = VokenDataset(held_out, encoder, voken_ids, LatentTargets(pipeline.vae, sd_resolution(pipeline)))
            gap = conditioning_gap(trained, *mapped_conditions(trained, test))
            metrics.update({f"heldout_diffusion_loss_{k}": v for k, v in gap.items()})
            log(f"held-out diffusion loss on {len(test)} pairs: right conditioning {gap['right']:.4f}, "
                f"shuffled {gap['shuffled']:.4f} (paired gap {gap['gap']:.4f} +- {gap['gap_se']:.4f}), "
                f"unconditional {gap['unconditional']:.4f}")
        Path(t["output_dir"], "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        log("loss " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "skipped"))
        if dataset.skipped:
            log(dataset.skip_report())
        if args.push_to_hub:
            push(t["output_dir"], args.hub_model_id, log=log)


if __name__ == "__main__":
    run_recipe(main)
