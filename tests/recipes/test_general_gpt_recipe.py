"""The General-GPT recipe run as users run it, for a few steps on the small world and zoo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import mmpeft
from mmpeft.data.embeddings import read_embedding_set
from mmpeft.export import export_run
from mmpeft.general_gpt.checkpoint import load_general_gpt
from mmpeft.general_gpt.evaluation import retrieval_figures
from mmpeft.general_gpt.model import retrieval_prompt
from mmpeft.hub import model_card, plan_push

ROOT = Path(__file__).resolve().parents[2]


def test_trains_writes_and_reloads_to_the_same_regression(small_world, small_zoo, tmp_path):
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", str(ROOT / "recipes" / "general_gpt.py"),
           f"fixture.world_dir={small_world}", f"fixture.zoo_dir={small_zoo[0]}", f"training.output_dir={out}",
           "training.max_steps=4", "training.save_steps=2", "training.micro_batch_size=4", "training.log_steps=1",
           "eval.limit=10", "eval.captions=3", "eval.max_new_tokens=4", "threads=1",
           f"data.embedding_cache={tmp_path / 'embeddings'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["history"]
    assert all(h["loss"] == pytest.approx(h["lm_loss"] + h["mse_loss"], rel=1e-4) for h in history)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"recall_at_1", "chance_at_1", "clip_text_recall_at_1", "caption_word_f1", "caption_word_f1_shuffled"} \
        <= set(metrics)
    assert (tmp_path / "embeddings" / "train" / "vectors.safetensors").exists()
    model, tokenizer, settings = load_general_gpt(out)
    again, _, _ = load_general_gpt(out / "checkpoint-4")
    vectors, texts = read_embedding_set(tmp_path / "embeddings" / "test")
    a = retrieval_figures(model, tokenizer, vectors, texts, 10)
    b = retrieval_figures(again, tokenizer, vectors, texts, 10)
    assert a == b and settings["embed_dim"] == vectors.shape[1]
    assert torch.equal(model.embed_out.weight, again.embed_out.weight)
    loaded = mmpeft.load(out)
    assert retrieval_figures(loaded.model, loaded.processor, vectors, texts, 10) == a
    card = ModelCard(str(model_card(plan_push(out), "someone/general-gpt-tiny")))
    assert card.data.pipeline_tag == "text-generation" and "lora" in card.data.tags
    exported = export_run(out, tmp_path / "exported")
    merged = AutoModelForCausalLM.from_pretrained(exported)
    ids = torch.tensor([retrieval_prompt(tokenizer, "a red square")])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model.lm(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
