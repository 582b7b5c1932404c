"""The GILL recipe and its answer command run as users run them, on the small world and zoo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpeft.gill.checkpoint import load_gill

ROOT = Path(__file__).resolve().parents[2]
FILES = {"chat_template.jinja", "gill_heads.safetensors", "lm_adapter", "mmpeft_config.json", "tokenizer.json",
         "tokenizer_config.json"}
RUN_REPORT = {"metrics.jsonl", "runs", "training.png"}  # mmpeft.train.reporting: metrics, TensorBoard, plot


@pytest.fixture(scope="module")
def run(small_world, small_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("gill") / "run"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", str(ROOT / "recipes" / "gill.py"),
           f"fixture.world_dir={small_world}", f"fixture.zoo_dir={small_zoo[0]}", f"training.output_dir={out}",
           "training.max_steps=4", "training.save_steps=2", "training.micro_batch_size=4", "training.log_steps=1",
           "threads=1", f"data.target_cache={out.parent / 'targets'}", "model.mapper.d_model=32",
           "model.mapper.ff=64", "eval.limit=8", "eval.generate=2", "eval.sampling_steps=2",
           "eval.decision.prompts=16", "eval.decision.steps=5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_writes_its_files_and_logs_every_loss_part(run):
    out, stdout = run
    assert {p.name for p in out.iterdir()} == FILES | RUN_REPORT | {"checkpoint-2", "checkpoint-4", "metrics.json",
                                                                "index"}
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == FILES | {"ds", "rng_rank0.pt", "trainer_state.json",
                                                                          "training.png"}
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["history"]
    assert set(history[0]) == {"step", "lr", "seconds", "loss", "caption_loss", "image_lm_loss", "retrieval_loss",
                               "generation_loss"}
    for h in history:
        parts = h["caption_loss"] + h["image_lm_loss"] + h["retrieval_loss"] + h["generation_loss"]  # GILL's weights
        assert abs(h["loss"] - parts) < 1e-4
    assert history[-1]["image_lm_loss"] < history[0]["image_lm_loss"]  # the [IMG0] row learns
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 8 and metrics["chance_at_1"] == pytest.approx(1 / 8)
    assert {"recall_at_5", "clip_text_recall_at_1", "decision_accuracy", "decision_majority",
            "story_captions_clip_image_similarity", "story_captions_images_recall_at_1"} <= set(metrics)
    assert "held-out text-to-image retrieval over 8 images" in stdout


def test_the_output_and_its_last_checkpoint_load_to_the_same_heads(run):
    out, _ = run
    final, tokenizer, _ = load_gill(out)
    ckpt, _, _ = load_gill(out / "checkpoint-4")
    ids = torch.tensor([[5, 6, *final.voken_ids]])
    a, b = final.image_pass(ids, torch.ones_like(ids)), ckpt.image_pass(ids, torch.ones_like(ids))
    assert torch.allclose(a[1], b[1]) and torch.allclose(final.mapper(a[2]), ckpt.mapper(b[2]))
    # the decision head is trained after the main run: only the output folder has it
    assert not torch.allclose(final.decision.linear.weight, ckpt.decision.linear.weight)


def test_answer_writes_a_page_with_the_choice_and_its_probability(run, tmp_path):
    out, _ = run
    cmd = [sys.executable, str(ROOT / "recipes" / "gill_answer.py"), str(out), "--index", str(out / "index"),
           "--prompt", "There is a large red square at the top left.", "--force-image", "--steps", "2",
           "--out", str(tmp_path / "page" / "index.html")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "page" / "index.html").read_text()
    assert "P(retrieve) = " in page and "retrieved (cosine" in page


def test_qlora_with_lora_on_the_lm_trains_and_reloads(small_world, small_zoo, tmp_path):
    out = tmp_path / "qlora"
    cmd = [sys.executable, str(ROOT / "recipes" / "gill.py"), f"fixture.world_dir={small_world}",
           f"fixture.zoo_dir={small_zoo[0]}", f"training.output_dir={out}", "training.max_steps=2",
           "training.micro_batch_size=4", "training.log_steps=1", "threads=1", "data.target_cache=null",
           "model.mapper.d_model=32", "model.mapper.ff=64", "model.trainable.llm=lora", "model.qlora=true",
           "eval.pairs=null", "eval.decision.prompts=8", "eval.decision.steps=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LM lora" in proc.stdout
    model, _, settings = load_gill(out)
    assert settings["qlora"] and type(model.lm.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ \
        == "Linear4bit"
    adapter = json.loads((out / "lm_adapter" / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"] and adapter["r"] == 8


def test_mmpeft_load_rebuilds_it_and_the_export_is_a_plain_lm_with_the_img_rows(run, tmp_path):
    from transformers import AutoModelForCausalLM

    import mmpeft
    from mmpeft.export import export_run

    out, _ = run
    model, _, settings = load_gill(out)
    loaded = mmpeft.load(out)
    ids = torch.tensor([[5, 6, *model.voken_ids]])
    with torch.no_grad():
        a, b = loaded.model.image_pass(ids, torch.ones_like(ids)), model.image_pass(ids, torch.ones_like(ids))
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
        logits = model.lm(input_ids=ids).logits
    assert loaded.settings["recipe"] == "gill" and loaded.settings["launch"]["argv"][0].endswith("gill.py")
    exported = export_run(out, tmp_path / "export")
    lm = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert (exported / "gill_heads.safetensors").read_bytes() == (out / "gill_heads.safetensors").read_bytes()
