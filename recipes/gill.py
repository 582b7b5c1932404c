"""GILL on caption pairs: the LM learns to caption images given as a few input tokens and to
answer a caption with `[IMG0]`..`[IMG7]`, whose states retrieve the image (contrastive
head), map into Stable Diffusion's prompt embeddings (generation mapper) and, in a small
last step, decide between the two (decision head).

    deepspeed recipes/gill.py                                             # tiny preset, tiny world, CPU
    deepspeed recipes/gill.py model.trainable.llm=lora                    # LoRA on the LM as well
    deepspeed recipes/gill.py --push_to_hub --hub_model_id you/gill       # push when the run ends

Trains: the `[IMG]` rows of the LM's input embeddings and output head, the image input map,
the retrieval head, the generation mapper; then the decision head alone. Frozen: the LM
(unless `model.trainable.llm` says lora), CLIP, Stable Diffusion. Writes to
`training.output_dir`: `lm_adapter/`, `gill_heads.safetensors`, tokenizer, `mmpeft_config.json`,
`checkpoint-{step}/` (decision head untrained there), `metrics.json`, `metrics.jsonl`,
`training.png`, `index/` (a retrieval index of the held-out images the decision was taught
to retrieve).
"""

import json
import os
from pathlib import Path

import torch

from mmpeft.data.coco import read_coco
from mmpeft.data.conversation import ConversationEncoder
from mmpeft.data.diffusion_targets import CaptionTargets, prepare_targets
from mmpeft.data.readers import read_caption_jsonl, read_caption_shards
from mmpeft.data.stories import read_vist
from mmpeft.data.templates import chat_template
from mmpeft.gill import decision
from mmpeft.gill import evaluation as ev
from mmpeft.gill.checkpoint import build_gill, load_gill, save_gill
from mmpeft.gill.data import ClipEmbeddings, GillDataset, collate_gill
from mmpeft.gill.model import TokenRowRenormaliser
from mmpeft.gill.retrieval_index import RetrievalIndex
from mmpeft.hub import push
from mmpeft.llava.model import load_base_models
from mmpeft.minigpt5.checkpoint import empty_caption, mapper_settings
from mmpeft.models.trainable import LoraSettings, apply_trainability, frozen_modules, trainable_parameter_count
from mmpeft.models.vokens import trainable_token_targets
from mmpeft.presets import load_clip, load_diffusion, resolve_preset
from mmpeft.start import launch_record, run_recipe, start_recipe
from mmpeft.train.loop import TrainConfig, train, training_dtype
from mmpeft.train.placement import rank_device

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "gill_tiny.yaml"


def read_pairs(source: dict):
    if source["format"] == "caption_shards":
        return read_caption_shards(source["path"])
    if source["format"] == "caption_jsonl":
        return read_caption_jsonl(source["path"], source["image_folder"])
    raise ValueError(f"data format must be caption_shards or caption_jsonl, not {source['format']!r}")


def main(argv=None):
    args, cfg, zoo, rank, log = start_recipe(__doc__, DEFAULT_CONFIG, argv, os.environ)
    m, d, t, e = cfg["model"], cfg["data"], cfg["training"], cfg["eval"]

    ##### model
    preset = resolve_preset(m["preset"], zoo_dir=zoo, lm=m.get("lm_path"), clip=m.get("clip_path"),
                            diffusion=m.get("diffusion_path"))
    dtype = training_dtype(t)
    lm, tokenizer, vision, image_processor = load_base_models(preset, qlora=m["qlora"], dtype=dtype,
                                                              attn_implementation=m["attn_implementation"])
    pipeline = load_diffusion(preset, dtype=dtype)
    pipeline.text_encoder.requires_grad_(False)
    torch.manual_seed(t["seed"])
    build = {"base_tokens": len(tokenizer), "clip_dim": vision.config.hidden_size, "image_token": m["image_token"],
             "n_vokens": m["n_vokens"], "image_tokens": m["image_tokens"], "retrieval_dim": m["retrieval_dim"],
             "mapper": mapper_settings(lm.config.hidden_size, pipeline, **m["mapper"], input_layers=1),
             "decision_dropout": m["decision_dropout"], "weights": cfg["loss"]["weights"]}
    model = build_gill(lm, tokenizer, **build)
    rows = {name: model.voken_ids for name in trainable_token_targets(lm).values()}
    parts, choice = {"llm": lm.base_model}, {"llm": m["trainable"]["llm"]}
    model.lm = apply_trainability(lm, parts, choice, LoraSettings(**m["lora"]), token_rows=rows)
    # GILL runs the frozen LM in eval mode (OPT's dropout 0.1 off), as CLIP and SD's text encoder
    frozen = [*frozen_modules(parts, choice), vision, pipeline.text_encoder]
    model.decision.requires_grad_(False)  # trained in its own step after the main run
    trainable, total = trainable_parameter_count(model)
    log(f"model: {total:,} parameters, {trainable:,} trainable ([IMG] rows, heads, LM {m['trainable']['llm']})")

    ##### data
    encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, d["conversation_format"]),
                                  m["image_token"], m["image_tokens"], d["max_length"])
    pairs = read_pairs(d["train"])
    clip = ClipEmbeddings(vision, image_processor, d["target_cache"])
    captions = CaptionTargets(pipeline.tokenizer, pipeline.text_encoder, d["target_cache"])
    good = [p for p in pairs if not p.problem]  # the dataset judges the bad ones
    prepare_targets(clip, [p.images[0] for p in good], log=log)
    prepare_targets(captions, [p.messages[-1]["content"] for p in good], log=log)
    dataset = GillDataset(pairs, encoder, model.voken_ids, d["prompt"], clip, captions, d["skip_bad_records"])
    log(f"data: {len(dataset)} caption pairs from {d['train']['path']}"
        + (f"; skipped {dataset.skip_report()}" if dataset.skipped else ""))

    ##### training
    settings = {"recipe": "gill", "launch": launch_record(__file__, argv),
                "sources": {"lm": preset.lm, "clip": preset.clip, "diffusion": preset.diffusion},
                "build": build, "qlora": m["qlora"], "config": cfg}

    renormaliser = TokenRowRenormaliser(model.lm)

    def renormalise(engine):  # GILL's: the [IMG] rows back to the vocabulary's mean norm after each step
        renormaliser(zero3=engine.zero_optimization_stage() == 3)

    def export(folder, is_main):
        if is_main:
            save_gill(model, folder, tokenizer, settings)

    collate = collate_gill(tokenizer.pad_token_id, d["concat_captions"], len(encoder.lead_ids), t["seed"])
    history = train(model, dataset, collate, TrainConfig(**t),
                    forward=lambda engine, batch: engine(**batch), export=export, lengths=dataset.lengths,
                    has_image=[True] * len(dataset), resume=args.resume, log=log, frozen=frozen,
                    after_step=renormalise if m["renormalise_img_rows"] else None, run_config=cfg)

    ##### decision head, then evaluation: held-out pairs and stories, the model as saved
    if rank == 0:
        metrics = {k: v for k, v in history[-1].items() if k.endswith("loss")} | {"first_loss": history[0]["loss"]}
        device = rank_device()  # evaluation runs on this rank's accelerator
        trained = load_gill(t["output_dir"], dtype=dtype)[0].to(device)
        pipeline.to(device)
        fresh = ClipEmbeddings(vision.to(device), image_processor)  # held-out images: not in the training cache
        encoder.max_length = lm.config.max_position_embeddings  # story queries are longer than training's
        dec = e["decision"]

        def covered(im):  # the tiny world's index holds the scenes of at most `index_max_objects` objects
            return len(im.objects) <= dec["index_max_objects"]

        def decision_data(split, limit):
            if dec["labels"] == "prompts_file":
                prompts, labels = decision.read_decision_prompts(split)
                images = None
            else:
                images = read_coco(split["images"], split["captions"], split["instances"])[:limit]
                prompts, labels = [im.captions[0] for im in images], decision.coverage_labels(images, covered)
            at0, _ = ev.image_pass_outputs(trained, encoder, [ev.query(p, d["prompt"], m["n_vokens"])
                                                              for p in prompts[:limit]], fresh)
            return images, at0, labels[:limit]

        _, fit_at0, fit_labels = decision_data(dec["train"], dec["prompts"])
        metrics["decision_train_loss"] = decision.train_decision(trained, fit_at0, fit_labels, dec["steps"],
                                                                 dec["lr"])
        save_gill(trained, t["output_dir"], tokenizer, settings)
        if dec["test"]:
            test_images, test_at0, test_labels = decision_data(dec["test"], None)
            metrics |= decision.decision_figures(trained, test_at0, test_labels)
            if test_images is not None:  # for recipes/gill_answer.py
                RetrievalIndex.build([im.path for im in test_images if covered(im)], fresh, preset.clip).save(
                    Path(t["output_dir"]) / "index")
        if e["pairs"]:
            clip_model, clip_processor = load_clip(preset)
            clip_model.to(device)
            test = read_pairs(e["pairs"])[: e["limit"]]
            figures, _ = ev.retrieval_figures(trained, encoder, test, fresh, clip_model, clip_processor, d["prompt"])
            negative = empty_caption(pipeline)
            gen, _ = ev.generation_figures(trained, pipeline, encoder, test[: e["generate"]], fresh, clip_model,
                                           clip_processor, d["prompt"], negative, e["guidance"], e["sampling_steps"])
            stories = dict(list(read_vist(e["stories"], e["story_images"]).items())[: e["limit"]])
            story = ev.story_figures(trained, pipeline, encoder, stories, fresh, clip_model, clip_processor,
                                     d["prompt"], negative, e["guidance"], e["sampling_steps"])
            metrics |= figures | gen | {f"story_{k}": v for k, v in story.items()}
            log(ev.describe(metrics))
        Path(t["output_dir"], "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        log("loss " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("loss")))
        if args.push_to_hub:
            push(t["output_dir"], args.hub_model_id, log=log)


if __name__ == "__main__":
    run_recipe(main)
