"""MiniGPT-5 stage 2, multimodal learning on VIST-format stories: from the earlier steps of a
story (sentences and images), generate the next image (text -> image), the next sentence
and image (context -> text + image), or the sentence of a shown image (image -> text).

    deepspeed recipes/minigpt5_stage2.py                                  # tiny preset, tiny world, CPU
    deepspeed recipes/minigpt5_stage2.py model.qlora=true                 # 4-bit NF4 LM
    deepspeed recipes/minigpt5_stage2.py model.init_from=null \
        'model.mapper_trainable={mlp: full, query: full, transformer: full}'  # without stage 1 (says so)
    deepspeed recipes/minigpt5_stage2.py data.history=2                  # 2 earlier steps, not all
    deepspeed recipes/minigpt5_stage2.py --push_to_hub --hub_model_id you/minigpt5-stage2  # push when the run ends
    deepspeed --num_gpus 2 recipes/minigpt5_stage2.py training.ds_config=ds_configs/zero3.json

Trains: LoRA on the LM (q/v projections by default), the vokens' rows, the mapper's
transformer, the connector (the tiny config; MiniGPT-5 keeps it frozen, as the Vicuna
config does). Frozen, and in eval mode: other LM weights, CLIP, the mapper's MLP and query,
Stable Diffusion. Starts from the stage-1 folder in `model.init_from` (voken rows, mapper,
connector); `model.init_connector` replaces its connector. Context: all earlier story steps
(`data.history: null`, as MiniGPT-5) or the last `data.history` of them.
Stops at start-up when a frozen part would stay random (the connector when neither
`model.init_connector` nor stage 1 gave one, the mapper without stage 1), and before reading
data when `data.max_length` cannot hold the largest sample that `data.history` asks for (the
errors give the settings and numbers); records skipped for any reason are
counted by reason in the start-up log and in `metrics.json` ("skipped"). Writes to
`training.output_dir`: the stage-1 file set plus the LoRA adapter, `checkpoint-{step}/`,
`metrics.json`, `metrics.jsonl`, `training.png` and `samples/index.html` (held-out stories
with the generated text and image next to the true one).
"""

import json
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmpeft.data.conversation import ConversationEncoder
from mmpeft.data.diffusion_targets import LatentTargets, prepare_targets, sd_resolution
from mmpeft.data.feature_cache import prepare_feature_cache
from mmpeft.data.stories import VokenDataset, check_story_fit, collate_vokens, read_vist, story_samples
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
    read_stage1,
    save_minigpt5,
    training_scheduler,
)
from mmpeft.minigpt5.evaluation import describe_story_figures, story_figures, story_page_rows
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
from mmpeft.pages import write_story_page
from mmpeft.presets import load_clip, load_diffusion, resolve_preset
from mmpeft.start import launch_record, run_recipe, start_recipe
from mmpeft.train.loop import TrainConfig, train, training_dtype
from mmpeft.train.placement import rank_device

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "minigpt5_stage2_tiny.yaml"


def main(argv=None):
    args, cfg, zoo, rank, log = start_recipe(__doc__, DEFAULT_CONFIG, argv, os.environ)
    m, d, t, loss, e = cfg["model"], cfg["data"], cfg["training"], cfg["loss"], cfg["eval"]

    ##### start-up checks, before any model loads: no frozen part may stay random
    stage1 = read_stage1(m["init_from"]) if m["init_from"] else None
    connector_from = m.get("init_connector") or (stage1 or {}).get("connector_from")
    check_frozen_parts_loaded(
        [PartOrigin("connector", "model.trainable.connector", m["trainable"]["connector"] == "frozen", connector_from,
                    "give model.init_connector=<a LLaVA stage-1 output, or a folder or Hub id with LLaVA's "
                    "mm_projector.bin>, or a model.init_from whose stage 1 was given one"),
         *(PartOrigin(f"mapper.{part}", f"model.mapper_trainable.{part}", how == "frozen", m["init_from"],
                      "give model.init_from=<a MiniGPT-5 stage-1 output>")
           for part, how in m["mapper_trainable"].items())],
        m.get("allow_random_frozen", []))
    new_connector = connector_source(m["init_connector"]) if m.get("init_connector") else None

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
    mapper_args = mapper_settings(lm.config.hidden_size, pipeline, **m["mapper"])
    mapper = VokenMapper(**mapper_args).to(dtype)
    if stage1 is not None:
        stage1_dir = Path(m["init_from"])
        if stage1["mapper"] != mapper_args:
            raise ValueError(f"model.mapper {mapper_args} differs from the stage-1 mapper {stage1['mapper']} in "
                             f"{stage1_dir}")
        from peft import PeftModel  # here, so mmpeft's import quiets bitsandbytes first

        llava = PeftModel.from_pretrained(llava, stage1_dir / "llava_adapter").merge_and_unload()  # voken rows
        llava.model.multi_modal_projector.load_state_dict(load_file(stage1_dir / "connector.safetensors"))
        mapper.load_state_dict(load_file(stage1_dir / "mapper.safetensors"))
        log(f"voken rows, mapper and connector: from stage 1 at {stage1_dir}")
    else:
        log("no stage-1 folder given (model.init_from): voken rows, mapper and connector start from scratch")
    if new_connector is not None:
        read = load_connector(llava.model.multi_modal_projector, new_connector, m["connector"])
        log(f"connector: from {m['init_connector']} ({read.name})")
    elif connector_from is None:
        log("connector: random (neither stage 1 nor model.init_connector gave one), trained here")
    image_seq_length = llava.config.image_seq_length
    rows = {name: voken_ids for name in trainable_token_targets(llava).values()}
    parts = llava_parts(llava)
    llava = apply_trainability(llava, parts, m["trainable"], LoraSettings(**m["lora"]), token_rows=rows)
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
    log(f"model: {total:,} parameters, {trainable:,} trainable (LM {m['trainable']['llm']}, voken rows, "
        f"mapper {m['mapper_trainable']}, qlora {m['qlora']})")

    ##### data
    encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, d["conversation_format"]),
                                  m["image_token"], image_seq_length, d["max_length"])
    shapes = check_story_fit(encoder, voken_ids, d["prompts"], d["tasks"], d["history"])  # before any data is read
    largest = max(shapes, key=lambda s: s.tokens)
    log(f"data.max_length {d['max_length']} holds the largest sample before its sentences: {largest.describe()}")
    bad_stories = Counter() if d["skip_bad_records"] else None  # counted there, or an error naming the story
    stories = read_vist(d["train"]["path"], d["train"]["image_folder"], skipped=bad_stories)
    samples = [s for sid, steps in stories.items()
               for s in story_samples(sid, steps, d["prompts"], d["tasks"], d["history"], m["n_vokens"])]
    latents = LatentTargets(pipeline.vae, sd_resolution(pipeline), d["target_cache"])
    dataset = VokenDataset(samples, encoder, voken_ids, latents, None, d["skip_bad_records"])
    dataset.skipped.update({f"story: {kind}": n for kind, n in (bad_stories or {}).items()})
    prepare_targets(latents, [im for s in dataset.items for im in s.targets], log=log)  # kept records, checked
    if d["feature_cache"]:  # the frozen tower's features of the context images, computed once
        dataset.conversations.features = prepare_feature_cache(d["feature_cache"], dataset.conversations.images(),
                                                               encoder, vision, m["vision_feature_layer"], log=log)
    log(f"data: {len(dataset)} samples ({', '.join(d['tasks'])}) from {len(stories)} stories in "
        f"{d['train']['path']}; " + (dataset.skip_report() or "no record skipped"))

    ##### training
    processor = llava_processor(image_processor, tokenizer, vision.config, m["image_token"])
    settings = minigpt5_settings("minigpt5_stage2", preset, mapper_args, cfg, launch_record(__file__, argv),
                                 connector_from=(m.get("init_connector") or m["init_from"]) if connector_from else None,
                                 prediction_type=prediction_type)

    def export(folder, is_main):
        if is_main:
            save_minigpt5(model, folder, processor, settings)

    history = train(model, dataset, collate_vokens(tokenizer.pad_token_id), TrainConfig(**t),
                    forward=lambda engine, batch: engine(**batch), export=export,
                    lengths=dataset.lengths, has_image=dataset.has_image, resume=args.resume, log=log,
                    frozen=frozen, run_config=cfg)

    ##### evaluation: the last step of held-out stories, the model as saved
    if rank == 0:
        metrics = {k: history[-1][k] for k in history[-1] if k.endswith("loss")}
        metrics["first_loss"] = history[0]["loss"]
        metrics["skipped"] = dict(dataset.skipped)
        if e["stories"]:
            device = rank_device()  # evaluation and generation run on this rank's accelerator
            trained, _, trained_pipe, _ = load_minigpt5(t["output_dir"], dtype=dtype)
            trained, trained_pipe = trained.to(device), trained_pipe.to(device)
            test = list(read_vist(e["stories"], e["image_folder"]).items())[: e["limit"]]
            items = {task: [s for sid, steps in test for s in story_samples(
                sid, steps, d["prompts"], [task], d["history"], m["n_vokens"], last_step_only=True)]
                for task in ("image", "multimodal", "text")}
            clip, clip_processor = load_clip(preset)
            clip.to(device)
            figures, generated = story_figures(trained, trained_pipe, encoder, items, clip, clip_processor,
                                               e["guidance"], e["sampling_steps"])
            metrics.update(figures)
            rows = story_page_rows(trained, trained_pipe, encoder, dict(test), items, generated, d["history"],
                                   e["guidance"], e["sampling_steps"], e["page_stories"])
            write_story_page(Path(t["output_dir"]) / "samples" / "index.html", rows, "MiniGPT-5 on held-out stories")
            log(describe_story_figures(figures))
        Path(t["output_dir"], "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        log("loss " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("loss")))
        if dataset.skipped:
            log(dataset.skip_report())
        if args.push_to_hub:
            push(t["output_dir"], args.hub_model_id, log=log)


if __name__ == "__main__":
    run_recipe(main)
