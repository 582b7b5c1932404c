"""LLaVA stage 2, visual instruction tuning: LoRA (or 4-bit NF4 QLoRA, or full fine-tuning)
on the LLM plus the fully trained connector, on multi-turn instruction conversations.

    deepspeed recipes/llava_finetune.py                                  # tiny preset, tiny world, CPU
    deepspeed recipes/llava_finetune.py model.qlora=true                 # QLoRA
    deepspeed recipes/llava_finetune.py --config llava_finetune_from_llava15_7b  # from llava-hf/llava-1.5-7b-hf
    deepspeed recipes/llava_finetune.py --config recipes/configs/llava_finetune_7b.yaml
    deepspeed --num_gpus 2 recipes/llava_finetune.py training.ds_config=ds_configs/zero3.json
    python recipes/llava_finetune.py --resume latest                     # continue a killed run
    deepspeed recipes/llava_finetune.py --push_to_hub --hub_model_id you/llava-finetune  # push when the run ends

Trains: LoRA on every linear layer of the LLM (not its head), the connector (its own
learning rate). Frozen: vision tower, LLM weights; frozen parts run in eval mode. Starts
from the preset's LM and CLIP with the stage-1 connector in `model.init_connector` (an
mmpeft stage-1 folder, or LLaVA's released `mm_projector.bin`); without one it says so and
starts the connector from scratch, or, when the connector is frozen, stops at start-up
(`model.allow_random_frozen` lists a part to keep random and frozen all the same).
With `model.init_from` (a released LLaVA in transformers' layout, such as
llava-hf/llava-1.5-7b-hf) every part, the tokenizer and image processor come from that
checkpoint instead, and the run records it as its base.
Writes to `training.output_dir`: the LM adapter (`adapter_model.safetensors`, loadable with
plain PEFT; not with `init_from`), `llava_adapter/`, `connector.safetensors`, the processor,
`mmpeft_config.json`, `checkpoint-{step}/` (the same files plus the resumable engine state),
`metrics.json`, `metrics.jsonl`, `training.png`.
"""

import json
import os
from pathlib import Path

import torch

from mmpeft.data.conversation import ConversationEncoder
from mmpeft.data.dataset import collate_conversations, conversation_dataset
from mmpeft.data.feature_cache import prepare_feature_cache
from mmpeft.data.prepared import files_fingerprint
from mmpeft.data.readers import iter_llava_json, iter_messages_dataset
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
from mmpeft.llava.released import load_connector, load_released_llava
from mmpeft.models.trainable import (
    LoraSettings,
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

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "llava_finetune_tiny.yaml"


def main(argv=None):
    args, cfg, zoo, rank, log = start_recipe(__doc__, DEFAULT_CONFIG, argv, os.environ)
    m, d, t = cfg["model"], cfg["data"], cfg["training"]

    ##### start-up check, before any model loads: a frozen connector must come from stage 1
    check_frozen_parts_loaded([PartOrigin("connector", "model.trainable.connector",
                                          m["trainable"].get("connector", "frozen") == "frozen",
                                          m.get("init_connector") or m.get("init_from"),
                                          "give model.init_connector=<a LLaVA stage-1 output, or a folder with "
                                          "LLaVA's released mm_projector.bin>")],
                              m.get("allow_random_frozen", []))

    ##### model
    dtype = training_dtype(t)
    if m.get("init_from"):  # a released LLaVA brings every part: settings that choose them elsewhere would be ignored
        clash = [f"model.{k}" for k in ("init_connector", "lm_path", "clip_path", "connector_options") if m.get(k)]
        clash += ["model.connector (its connector is mlp2x_gelu)"] if m["connector"] != "mlp2x_gelu" else []
        if clash:
            raise ValueError(f"model.init_from ({m['init_from']}) brings the vision tower, connector and LM; "
                             f"unset {', '.join(clash)}")
        model, processor = load_released_llava(m["init_from"], m["qlora"], dtype, log=log)
        zero3 = None  # a released LLaVA loads whole: its tower, connector and LM come in one file set
        tokenizer, image_processor, vision = processor.tokenizer, processor.image_processor, model.model.vision_tower
        image_token, layer = processor.image_token, model.config.vision_feature_layer
        sources = {"llava": m["init_from"]}  # mmpeft.load rebuilds the base from it
        log(f"model: from {m['init_from']}, its image token {image_token!r} and vision_feature_layer {layer}")
        torch.manual_seed(t["seed"])
    else:
        preset = resolve_preset(m["preset"], zoo_dir=zoo, lm=m.get("lm_path"), clip=m.get("clip_path"))
        zero3 = zero3_loading_config(t, quantized=m["qlora"])  # ZeRO-3: each rank loads only its shard of the LM
        lm, tokenizer, vision, image_processor = load_base_models(preset, qlora=m["qlora"], dtype=dtype, log=log,
                                                                  attn_implementation=m["attn_implementation"],
                                                                  zero3=zero3)
        image_token, layer = m["image_token"], m["vision_feature_layer"]
        sources = {"lm": preset.lm, "clip": preset.clip}
        with partitioned_loading(zero3):
            image_token_id = add_image_token(tokenizer, lm, image_token)
        torch.manual_seed(t["seed"])
        model = build_llava(vision, lm, image_token_id, m["connector"], layer, m.get("connector_options"))
        processor = llava_processor(image_processor, tokenizer, vision.config, image_token,
                                    model.config.image_seq_length)
        if m["init_connector"]:
            read = load_connector(model.model.multi_modal_projector, m["init_connector"], m["connector"])
            log(f"connector: from stage 1 at {m['init_connector']} ({read.name})")
        else:
            log("connector: no stage-1 connector given (model.init_connector), so it starts from random weights")
    parts = llava_parts(model)
    model = apply_trainability(model, parts, m["trainable"], LoraSettings(**m["lora"]))
    trainable, total = trainable_parameter_count(model)
    log(f"model: {total:,} parameters, {trainable:,} trainable ({m['trainable']}, qlora {m['qlora']})")

    ##### data
    encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, d["conversation_format"]),
                                  image_token, model.config.image_seq_length, d["max_length"],
                                  d["pad_to_square"])
    source = d["train"]
    if source["format"] == "llava_json":
        samples = lambda: iter_llava_json(source["path"], source["image_folder"])  # noqa: E731
        data = {"files": files_fingerprint([source["path"]]), "images": source["image_folder"]}
    elif source["format"] == "messages_dataset":  # `messages` + `images` columns, as TRL's vision SFT reads
        import datasets

        hf = (datasets.load_from_disk(source["path"]) if Path(source["path"]).is_dir()
              else datasets.load_dataset(source["path"], split=source.get("split", "train")))
        samples = lambda: iter_messages_dataset(hf, id_column="id" if "id" in hf.column_names else None)  # noqa: E731
        data = {"dataset": hf._fingerprint}
    else:
        raise ValueError(f"data.train.format must be llava_json or messages_dataset, not {source['format']!r}")
    dataset = conversation_dataset(samples, data, encoder, d["prepared"], d["skip_bad_records"], str(source["path"]),
                                   log=log)
    if d["feature_cache"]:  # only while the tower is frozen: its output is then the same every epoch
        if m["trainable"]["vision"] != "frozen":
            raise ValueError("data.feature_cache needs model.trainable.vision: frozen")
        dataset.features = prepare_feature_cache(d["feature_cache"], dataset.images(), encoder, vision, layer,
                                                 log=log)
    log(f"data: {len(dataset)} conversations from {source['path']}" + (f"; {dataset.skip_report()}"
                                                                       if dataset.skip_report() else ""))

    ##### evaluation before training
    e = cfg["eval"]  # questions with checkable answers (the tiny world's); null skips evaluation
    questions = read_questions(e["questions"], e["image_folder"], e["limit"]) if e["questions"] else []
    device = rank_device()
    before = accuracy_before_training(model, encoder, questions, device, bool(zero3), log) if rank == 0 else None

    ##### training
    settings = {"recipe": "llava_finetune", "launch": launch_record(__file__, argv), "sources": sources,
                "connector": m["connector"], "connector_options": m.get("connector_options"),
                "image_token": image_token, "vision_feature_layer": layer, "trainable": m["trainable"],
                "qlora": m["qlora"], "config": cfg}

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
            figures, text = held_out_figures(trained.to(device), encoder, questions, before)
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
