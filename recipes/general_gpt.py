"""General-GPT: embedding-in and embedding-out tokens on a causal LM. A precomputed vector
goes in as an input embedding (`[CLIP IN] <emb> [\\CLIP IN] Caption: ...`, captioning, or
`<emb> ...`, sentence reconstruction) and comes out as an MSE regression from the last
layer's state at `[CLIP OUT]` (`Caption: ... [CLIP OUT][\\CLIP OUT]`, retrieval by nearest
neighbour), plus the LM loss.

    deepspeed recipes/general_gpt.py                                     # tiny preset, tiny world, CPU
    deepspeed recipes/general_gpt.py data.train.embeddings=my_set/ eval.test.embeddings=my_test_set/
    deepspeed recipes/general_gpt.py 'data.tasks=[sentence]' data.train.embeddings=sentence_vectors/
    deepspeed recipes/general_gpt.py --push_to_hub --hub_model_id you/general-gpt   # push when the run ends

Vectors come from any encoder as an embedding set (`mmpeft/data/embeddings.py`: a
`vectors.safetensors` and a `texts.jsonl` of `{"text", "row"}`). With no set given, the
recipe writes one from caption pairs with the preset's CLIP (normalised image embeddings).
Trains: the two linear maps, the new tokens' rows, and LoRA on the LM when asked; a frozen LM
runs in eval mode. Writes to `training.output_dir`: `general_gpt.safetensors`, `lm_adapter/`,
the tokenizer, `mmpeft_config.json`, `checkpoint-{step}/`, `metrics.json`, `metrics.jsonl`, `training.png`.
"""

import json
import os
from pathlib import Path

import torch

from mmpeft.data.embeddings import (
    EmbeddingTextDataset,
    clip_image_set,
    collate_embedding_texts,
    read_embedding_set,
)
from mmpeft.data.readers import read_caption_jsonl, read_caption_shards
from mmpeft.general_gpt.checkpoint import load_general_gpt, save_general_gpt
from mmpeft.general_gpt.evaluation import caption_figures, retrieval_figures
from mmpeft.general_gpt.model import (
    GeneralGPT,
    add_general_gpt_tokens,
    encode_sample,
)
from mmpeft.hub import push
from mmpeft.llava.model import load_base_models
from mmpeft.models.trainable import LoraSettings, apply_trainability, frozen_modules, trainable_parameter_count
from mmpeft.models.vokens import trainable_token_targets
from mmpeft.presets import load_clip, resolve_preset
from mmpeft.start import launch_record, run_recipe, start_recipe
from mmpeft.train.loop import TrainConfig, train, training_dtype
from mmpeft.train.placement import rank_device

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "general_gpt_tiny.yaml"


def embedding_set(source: dict, folder: Path, preset, log):
    """The set named by `source['embeddings']`, else one written into `folder` from its caption pairs."""
    if source.get("embeddings"):
        return read_embedding_set(source["embeddings"])
    if not (folder / "texts.jsonl").exists():
        pairs = source["pairs"]
        read = read_caption_shards(pairs["path"]) if pairs["format"] == "caption_shards" else \
            read_caption_jsonl(pairs["path"], pairs["image_folder"])
        clip, processor = load_clip(preset)
        clip_image_set(folder, read, clip.eval(), processor)
        log(f"embeddings: {len(read)} captions of {pairs['path']} with CLIP image embeddings into {folder}")
    return read_embedding_set(folder)


def main(argv=None):
    args, cfg, zoo, rank, log = start_recipe(__doc__, DEFAULT_CONFIG, argv, os.environ)
    m, d, t, e = cfg["model"], cfg["data"], cfg["training"], cfg["eval"]

    ##### data (first: the vectors' width sizes the maps)
    preset = resolve_preset(m["preset"], zoo_dir=zoo, lm=m.get("lm_path"), clip=m.get("clip_path"))
    cache = Path(d["embedding_cache"])
    if rank == 0:
        embedding_set(d["train"], cache / "train", preset, log)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 writes the set, the others read it
    vectors, texts = embedding_set(d["train"], cache / "train", preset, log)

    ##### model
    dtype = training_dtype(t)
    lm, tokenizer, _, _ = load_base_models(preset, qlora=m["qlora"], dtype=dtype,
                                           attn_implementation=m["attn_implementation"])
    ids = add_general_gpt_tokens(tokenizer, lm)
    torch.manual_seed(t["seed"])
    rows = {name: list(ids.values()) for name in trainable_token_targets(lm).values()}
    parts, choice = {"llm": lm.base_model}, {"llm": m["trainable"]["llm"]}
    lm = apply_trainability(lm, parts, choice, LoraSettings(**m["lora"]), token_rows=rows)
    model = GeneralGPT(lm, ids, vectors.shape[1], m["mse_weight"])
    model.embed_in.to(dtype)
    model.embed_out.to(dtype)
    trainable, total = trainable_parameter_count(model)
    log(f"model: {total:,} parameters, {trainable:,} trainable (the two maps, the 5 new rows, LM "
        f"{m['trainable']['llm']}); vectors of width {vectors.shape[1]}")
    dataset = EmbeddingTextDataset(vectors, texts, d["tasks"],
                                   lambda task, text: encode_sample(tokenizer, task, text, d["max_length"]))
    log(f"data: {len(texts)} texts on {vectors.shape[0]} vectors, tasks {d['tasks']}: {len(dataset)} samples")

    ##### training
    settings = {"recipe": "general_gpt", "launch": launch_record(__file__, argv), "sources": {"lm": preset.lm},
                "embed_dim": vectors.shape[1], "mse_weight": m["mse_weight"], "qlora": m["qlora"], "config": cfg}

    def export(folder, is_main):
        if is_main:
            save_general_gpt(model, folder, tokenizer, settings)

    history = train(model, dataset, collate_embedding_texts(tokenizer.pad_token_id), TrainConfig(**t),
                    forward=lambda engine, batch: engine(**batch), export=export, lengths=dataset.lengths,
                    has_image=[True] * len(dataset), resume=args.resume, log=log,
                    frozen=frozen_modules(parts, choice), run_config=cfg)  # a frozen LM: eval mode

    ##### evaluation: held-out vectors and texts, the model as saved
    if rank == 0:
        metrics = {k: v for k, v in history[-1].items() if k.endswith("loss")} | {"first_loss": history[0]["loss"]}
        if e["test"]:
            device = rank_device()  # evaluation runs on this rank's accelerator
            trained = load_general_gpt(t["output_dir"])[0].to(device)
            test_vectors, test_texts = embedding_set(e["test"], cache / "test", preset, log)
            clip = None if e["test"].get("embeddings") else load_clip(preset)
            if clip is not None:
                clip[0].to(device)
            metrics |= retrieval_figures(trained, tokenizer, test_vectors, test_texts, e["limit"], clip)
            if "caption" in d["tasks"] or "sentence" in d["tasks"]:
                task = "caption" if "caption" in d["tasks"] else "sentence"
                metrics |= caption_figures(trained, tokenizer, test_vectors, test_texts, task, e["captions"],
                                           e["max_new_tokens"])
        Path(t["output_dir"], "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        log(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                      if not isinstance(v, list)))
        if args.push_to_hub:
            push(t["output_dir"], args.hub_model_id, log=log)


if __name__ == "__main__":
    run_recipe(main)
