"""Flamingo-style fusion: a frozen causal LM reads images through a Perceiver Resampler and
gated cross-attention layers inserted before its decoder layers; only those two train.

    deepspeed recipes/flamingo.py                                        # tiny preset, tiny world, CPU
    deepspeed recipes/flamingo.py model.xattn_options.every=2 training.max_steps=300
    python recipes/flamingo.py --resume latest                           # continue a killed run
    deepspeed recipes/flamingo.py --push_to_hub --hub_model_id you/flamingo  # push when the run ends

Trains: the resampler and the gated cross-attention layers (gates start at 0, so the
model starts as the frozen LM). Frozen, and in eval mode: vision tower, LM. Each `<image>` stays one token;
text after it reads that image's visual tokens. Same data, chat template and held-out
questions as LLaVA stage 2 (`recipes/llava_finetune.py`), so its accuracy compares with
LLaVA's. Writes to `training.output_dir`: `flamingo.safetensors`, the tokenizer and image
processor, `mmpeft_config.json`, `checkpoint-{step}/` (the same files plus the resumable
engine state), `metrics.json`, `metrics.jsonl`, `training.png`.
"""

import json
import os
from pathlib import Path

import torch

from mmpeft.data.conversation import ConversationEncoder
from mmpeft.data.dataset import collate_conversations, conversation_dataset
from mmpeft.data.feature_cache import prepare_feature_cache
from mmpeft.data.prepared import files_fingerprint
from mmpeft.data.readers import iter_llava_json
from mmpeft.data.templates import chat_template
from mmpeft.eval.answers import read_questions
from mmpeft.flamingo.checkpoint import load_flamingo, save_flamingo
from mmpeft.flamingo.model import FlamingoLM
from mmpeft.hub import push
from mmpeft.llava.evaluation import accuracy_before_training, held_out_figures
from mmpeft.llava.model import add_image_token, load_base_models
from mmpeft.models.trainable import trainable_parameter_count
from mmpeft.presets import resolve_preset
from mmpeft.start import launch_record, run_recipe, start_recipe
from mmpeft.train.loop import TrainConfig, train, training_dtype
from mmpeft.train.placement import rank_device

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "flamingo_tiny.yaml"


def main(argv=None):
    args, cfg, zoo, rank, log = start_recipe(__doc__, DEFAULT_CONFIG, argv, os.environ)
    m, d, t = cfg["model"], cfg["data"], cfg["training"]

    ##### model
    preset = resolve_preset(m["preset"], zoo_dir=zoo, lm=m.get("lm_path"), clip=m.get("clip_path"))
    dtype = training_dtype(t)
    lm, tokenizer, vision, image_processor = load_base_models(preset, qlora=m["qlora"], dtype=dtype,
                                                              attn_implementation=m["attn_implementation"])
    image_token_id = add_image_token(tokenizer, lm, m["image_token"])
    torch.manual_seed(t["seed"])
    model = FlamingoLM(lm, vision, image_token_id, m["vision_feature_layer"], m["resampler_options"],
                       m["xattn_options"])
    model.requires_grad_(False)
    for part in model.trainable_parts().values():
        part.to(dtype=dtype).requires_grad_(True)
    trainable, total = trainable_parameter_count(model)
    log(f"model: {total:,} parameters, {trainable:,} trainable (resampler and {len(model.xattn)} gated "
        f"cross-attention layers, before decoder layers {model.xattn_at}; qlora {m['qlora']})")

    ##### data
    # one token per image: the visual tokens reach the text through cross-attention, not the sequence
    encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, d["conversation_format"]),
                                  m["image_token"], 1, d["max_length"], d["pad_to_square"])
    if d["train"]["format"] != "llava_json":
        raise ValueError(f"data.train.format: this recipe reads llava_json, not {d['train']['format']!r}")
    source = d["train"]
    dataset = conversation_dataset(lambda: iter_llava_json(source["path"], source["image_folder"]),
                                   {"files": files_fingerprint([source["path"]]), "images": source["image_folder"]},
                                   encoder, d["prepared"], d["skip_bad_records"], str(source["path"]), log=log)
    if d["feature_cache"]:  # the tower is frozen: its output is the same every epoch (shared with LLaVA's cache)
        dataset.features = prepare_feature_cache(d["feature_cache"], dataset.images(), encoder, vision,
                                                 m["vision_feature_layer"], log=log)
    log(f"data: {len(dataset)} conversations from {source['path']}" + (f"; {dataset.skip_report()}"
                                                                     if dataset.skip_report() else ""))

    ##### evaluation before training
    e = cfg["eval"]
    questions = read_questions(e["questions"], e["image_folder"], e["limit"]) if e["questions"] else []
    device = rank_device()  # evaluation runs on this rank's accelerator
    before = accuracy_before_training(model, encoder, questions, device, False, log) if rank == 0 else None

    ##### training
    settings = {"recipe": "flamingo", "launch": launch_record(__file__, argv),
                "sources": {"lm": preset.lm, "clip": preset.clip}, **{
        k: m[k] for k in ("image_token", "vision_feature_layer", "resampler_options", "xattn_options", "qlora")},
        "config": cfg}

    def export(folder, is_main):
        if is_main:
            save_flamingo(model, folder, tokenizer, image_processor, settings)

    history = train(model, dataset, collate_conversations(tokenizer.pad_token_id), TrainConfig(**t),
                    forward=lambda engine, batch: {"loss": engine(**{k: v for k, v in batch.items()
                                                                     if k != "id"}).loss},
                    export=export, lengths=dataset.lengths, has_image=dataset.has_image, resume=args.resume,
                    log=log, frozen=[model.vision_tower, model.lm], run_config=cfg)

    ##### evaluation after training
    if rank == 0:
        metrics = {"first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "skipped": dict(dataset.skipped),
                   "leading_assistant_turns_dropped": dataset.dropped_turns,
                   "gates": [round(torch.tanh(b.attn_gate).item(), 4) for b in model.xattn]}
        summary = f"loss {metrics['first_loss']:.4f} -> {metrics['last_loss']:.4f}; tanh(attention gates) " \
                  f"{metrics['gates']}"
        if questions:  # the model as saved, rebuilt from the output folder
            trained = load_flamingo(t["output_dir"])[0]
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
