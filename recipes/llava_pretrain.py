"""LLaVA stage 1, feature alignment: train the connector between a frozen CLIP vision tower
and a frozen LLM on caption pairs (the prompt is the image alone, the target its caption).

    deepspeed recipes/llava_pretrain.py                                  # tiny preset, tiny world, CPU
    deepspeed recipes/llava_pretrain.py --config recipes/configs/llava_pretrain_7b.yaml
    deepspeed recipes/llava_pretrain.py training.max_steps=50 model.connector=linear
    python recipes/llava_pretrain.py ...   (one process)   torchrun --nproc_per_node 2 recipes/llava_pretrain.py ...
    deepspeed recipes/llava_pretrain.py --push_to_hub --hub_model_id you/llava-pretrain  # push when the run ends

Trains: the connector only. Frozen, and in eval mode: vision tower, LLM. A frozen connector
(MiniGPT-4's Q-Former, of which only the projection trains) would stay random: the recipe
stops at start-up unless `model.allow_random_frozen` lists it.
With `data.feature_cache` set (the tiny config's default), the frozen tower's features are
computed once into that folder and read from there in every later epoch and run.
Writes to `training.output_dir`: `connector.safetensors`, the processor, `mmpeft_config.json`,
`checkpoint-{step}/` (the same files plus the resumable engine state), `metrics.json`, `metrics.jsonl`, `training.png`.
"""

import glob
import json
import os
from pathlib import Path

import torch

from mmpeft.data.conversation import ConversationEncoder
from mmpeft.data.dataset import collate_conversations, conversation_dataset
from mmpeft.data.feature_cache import prepare_feature_cache
from mmpeft.data.prepared import files_fingerprint
from mmpeft.data.readers import iter_llava_json, read_caption_jsonl, read_caption_shards
from mmpeft.data.templates import chat_template
from mmpeft.eval.answers import read_questions
from mmpeft.hub import push
from mmpeft.llava.checkpoint import load_llava, save_llava
from mmpeft.llava.evaluation import accuracy_before_training, held_out_figures
from mmpeft.llava.model import (
    add_image_token,
    build_llava,
    llava_forward,
    llava_parts,
    llava_processor,
    load_base_models,
)
from mmpeft.models.trainable import (
    PartOrigin,
    apply_trainability,
    check_frozen_parts_loaded,
    frozen_modules,
    trainable_parameter_count,
)
from mmpeft.presets import resolve_preset
from mmpeft.start import launch_record, run_recipe, start_recipe
from mmpeft.train.loop import TrainConfig, train, training_dtype
from mmpeft.train.placement import partitioned_loading, rank_device, zero3_loading_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "llava_pretrain_tiny.yaml"


def main(argv=None):
    args, cfg, zoo, rank, log = start_recipe(__doc__, DEFAULT_CONFIG, argv, os.environ)
    m, d, t = cfg["model"], cfg["data"], cfg["training"]

    ##### start-up check, before any model loads: this stage starts the connector from scratch
    check_frozen_parts_loaded([PartOrigin("connector", "model.trainable.connector",
                                          m["trainable"].get("connector", "frozen") == "frozen", None, "")],
                              m.get("allow_random_frozen", []))

    ##### model
    preset = resolve_preset(m["preset"], zoo_dir=zoo, lm=m.get("lm_path"), clip=m.get("clip_path"))
    dtype = training_dtype(t)  # loaded as trained: a 7B LM in fp32 is 27 GB
    zero3 = zero3_loading_config(t)  # ZeRO-3: each rank loads only its shard of the LM
    lm, tokenizer, vision, image_processor = load_base_models(preset, dtype=dtype, log=log,
                                                              attn_implementation=m["attn_implementation"], zero3=zero3)
    with partitioned_loading(zero3):
        image_token_id = add_image_token(tokenizer, lm, m["image_token"])
    torch.manual_seed(t["seed"])
    model = build_llava(vision, lm, image_token_id, m["connector"], m["vision_feature_layer"],
                        m.get("connector_options"))
    parts = llava_parts(model)
    model = apply_trainability(model, parts, m["trainable"])
    trainable, total = trainable_parameter_count(model)
    log(f"model: {total:,} parameters, {trainable:,} trainable ({m['trainable']})")

    ##### data
    encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, d["conversation_format"]),
                                  m["image_token"], model.config.image_seq_length, d["max_length"],
                                  d["pad_to_square"])
    source = d["train"]
    readers = {"caption_shards": lambda: read_caption_shards(source["path"]),
               "caption_jsonl": lambda: read_caption_jsonl(source["path"], source["image_folder"]),
               "llava_json": lambda: iter_llava_json(source["path"], source["image_folder"])}  # e.g. LLaVA's 558K
    if source["format"] not in readers:
        raise ValueError(f"data.train.format must be one of {', '.join(readers)}, not {source['format']!r}")
    files = sorted(glob.glob(source["path"])) if source["format"] == "caption_shards" else [source["path"]]
    dataset = conversation_dataset(readers[source["format"]], {"files": files_fingerprint(files),
                                                               "images": source.get("image_folder")},
                                   encoder, d["prepared"], d["skip_bad_records"], str(source["path"]), log=log)
    if d["feature_cache"]:  # the frozen tower's output, encoded once for every epoch and later runs
        if m["trainable"]["vision"] != "frozen":
            raise ValueError("data.feature_cache needs model.trainable.vision: frozen")
        dataset.features = prepare_feature_cache(d["feature_cache"], dataset.images(), encoder, vision,
                                                 m["vision_feature_layer"], log=log)
    log(f"data: {len(dataset)} samples from {source['path']}" + (f"; {dataset.skip_report()}"
                                                                 if dataset.skip_report() else ""))

    ##### evaluation before training
    e = cfg["eval"]  # questions with checkable answers (the tiny world's); null skips evaluation
    questions = read_questions(e["questions"], e["image_folder"], e["limit"]) if e["questions"] else []
    qa_encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, cfg["eval"]["format"]),
                                     m["image_token"], model.config.image_seq_length, d["max_length"])
    device = rank_device()
    before = accuracy_before_training(model, qa_encoder, questions, device, bool(zero3), log) if rank == 0 else None

    ##### training
    processor = llava_processor(image_processor, tokenizer, vision.config, m["image_token"],
                                model.config.image_seq_length)
    settings = {"recipe": "llava_pretrain", "launch": launch_record(__file__, argv),
                "sources": {"lm": preset.lm, "clip": preset.clip}, **{
        k: m.get(k) for k in ("connector", "connector_options", "image_token", "vision_feature_layer", "trainable")},
        "config": cfg}

    def export(folder, is_main):
        if is_main:
            save_llava(model, folder, processor, settings)

    history = train(model, dataset, collate_conversations(tokenizer.pad_token_id), TrainConfig(**t),
                    forward=lambda engine, batch: {"loss": llava_forward(engine, batch).loss}, export=export,
                    lengths=dataset.lengths, has_image=dataset.has_image, resume=args.resume, log=log,
                    frozen=frozen_modules(parts, m["trainable"]), run_config=cfg)

    ##### evaluation after training
    if rank == 0:
        metrics = {"first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "skipped": dict(dataset.skipped),
                   "leading_assistant_turns_dropped": dataset.dropped_turns}
        summary = f"loss {metrics['first_loss']:.4f} -> {metrics['last_loss']:.4f}"
        if questions:  # the model as saved, rebuilt from the output folder (free of ZeRO-3's partitioning)
            trained, _, _ = load_llava(t["output_dir"])
            figures, text = held_out_figures(trained.to(device), qa_encoder, questions, before)
            metrics.update(figures)
            summary += "; " + text
        Path(t["output_dir"], "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        log(summary)
        if dataset.skip_report():
            log(dataset.skip_report())
        if args.push_to_hub:
            push(t["output_dir"], args.hub_model_id, log=log)


if __name__ == "__main__":
    run_recipe(main)
