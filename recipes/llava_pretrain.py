"""LLaVA stage 1, feature alignment: train the connector between a frozen CLIP vision tower
and a frozen LLM on caption pairs (the prompt is the image alone, the target its caption).

    deepspeed recipes/llava_pretrain.py                                  # tiny preset, tiny world, CPU
    deepspeed recipes/llava_pretrain.py --config recipes/configs/llava_pretrain_7b.yaml
    deepspeed recipes/llava_pretrain.py training.max_steps=50 model.connector=linear
    python recipes/llava_pretrain.py ...   (one process)   torchrun --nproc_per_node 2 recipes/llava_pretrain.py ...

Trains: the connector only. Frozen: vision tower, LLM.
Writes to `training.output_dir`: `connector.safetensors`, the processor, `mmpeft_config.json`,
`checkpoint-{step}/` (the same files plus the resumable engine state), `metrics.json`.
"""

import argparse
import json
import os
from pathlib import Path

import torch

from mmpeft.config import fill, load_config
from mmpeft.data.dataset import ConversationDataset, collate_conversations
from mmpeft.data.llava import ConversationEncoder, read_caption_jsonl, read_caption_shards
from mmpeft.data.templates import chat_template
from mmpeft.eval.answers import answer_accuracy, read_questions
from mmpeft.models.llava import add_image_token, build_llava, llava_parts, llava_processor, load_base_models
from mmpeft.models.llava_io import save_llava
from mmpeft.models.trainable import apply_trainability, trainable_parameter_count
from mmpeft.presets import resolve_preset
from mmpeft.tiny import folders_for
from mmpeft.train.loop import TrainConfig, setup_distributed, train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "llava_pretrain_tiny.yaml"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest'")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rank, _ = setup_distributed()
    log = print if rank == 0 else (lambda *_: None)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])

    ##### tiny world and zoo (built once, by the first rank)
    world, zoo = folders_for(cfg, os.environ)
    cfg = fill(cfg, world=world, zoo=zoo)
    m, d, t = cfg["model"], cfg["data"], cfg["training"]

    ##### model
    preset = resolve_preset(m["preset"], zoo_dir=zoo, lm=m.get("lm_path"), clip=m.get("clip_path"))
    lm, tokenizer, vision, image_processor = load_base_models(preset)
    image_token_id = add_image_token(tokenizer, lm, m["image_token"])
    torch.manual_seed(t["seed"])
    model = build_llava(vision, lm, image_token_id, m["connector"], m["vision_feature_layer"])
    model = apply_trainability(model, llava_parts(model), m["trainable"])
    trainable, total = trainable_parameter_count(model)
    log(f"model: {total:,} parameters, {trainable:,} trainable ({m['trainable']})")

    ##### data
    encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, d["conversation_format"]),
                                  m["image_token"], model.config.image_seq_length, d["max_length"],
                                  d["pad_to_square"])
    source = d["train"]
    samples = (read_caption_shards(source["path"]) if source["format"] == "caption_shards"
               else read_caption_jsonl(source["path"], source["image_folder"]))
    dataset = ConversationDataset(samples, encoder, d["skip_bad_records"])
    log(f"data: {len(dataset)} samples from {source['path']}" + (f"; {dataset.skip_report()}"
                                                                 if dataset.skipped else ""))

    ##### evaluation before training
    questions = read_questions(cfg["eval"]["questions"], cfg["eval"]["image_folder"], cfg["eval"]["limit"])
    qa_encoder = ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, cfg["eval"]["format"]),
                                     m["image_token"], model.config.image_seq_length, d["max_length"])
    before = answer_accuracy(model, qa_encoder, questions) if rank == 0 else None

    ##### training
    processor = llava_processor(image_processor, tokenizer, vision.config, m["image_token"])
    settings = {"recipe": "llava_pretrain", "sources": {"lm": preset.lm, "clip": preset.clip}, **{
        k: m[k] for k in ("connector", "image_token", "vision_feature_layer", "trainable")}, "config": cfg}

    def export(folder, is_main):
        if is_main:
            save_llava(model, folder, processor, settings)

    history = train(model, dataset, collate_conversations(tokenizer.pad_token_id), TrainConfig(**t),
                    forward=lambda engine, batch: {"loss": engine(**batch).loss}, export=export,
                    lengths=dataset.lengths, has_image=dataset.has_image, resume=args.resume, log=log)

    ##### evaluation after training
    if rank == 0:
        model.eval()
        after = answer_accuracy(model, qa_encoder, questions)
        metrics = {"first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
                   "answer_accuracy_before": before["accuracy"], "answer_accuracy_after": after["accuracy"],
                   "chance": after["chance"], "by_type_after": after["by_type"], "skipped": dict(dataset.skipped)}
        Path(t["output_dir"], "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        log(f"loss {metrics['first_loss']:.4f} -> {metrics['last_loss']:.4f}; answer accuracy on "
            f"{after['questions']} held-out questions: {before['accuracy']:.3f} before, {after['accuracy']:.3f} "
            f"after (chance {after['chance']:.3f})")
        if dataset.skipped:
            log(dataset.skip_report())


if __name__ == "__main__":
    main()
