"""The MiniGPT-5 recipes run as users run them, for a few steps on the small world and zoo:
stage 1 under plain python, stage 2 from it on two DeepSpeed ranks under ZeRO-3."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mmpeft.minigpt5.checkpoint import load_minigpt5

ROOT = Path(__file__).resolve().parents[2]
EXPORT = {"chat_template.jinja", "connector.safetensors", "mmpeft_config.json", "processor_config.json",
          "tokenizer.json", "tokenizer_config.json", "llava_adapter", "mapper.safetensors"}
CHECKPOINT = {"ds", "trainer_state.json", "training.png"}
RUN_REPORT = {"metrics.jsonl", "runs", "training.png"}  # mmpeft.train.reporting: metrics, TensorBoard, plot
SCRATCH_MAPPER = "model.mapper_trainable={mlp: full, query: full, transformer: full}"  # no stage 1 to start from


def _run(script, out, world, zoo, *overrides, ranks=None):
    launcher = [sys.executable] if ranks is None else [str(Path(sys.executable).parent / "deepspeed"),
                                                       "--num_gpus", str(ranks)]
    cmd = [*launcher, str(ROOT / "recipes" / script), f"fixture.world_dir={world}", f"fixture.zoo_dir={zoo}",
           f"training.output_dir={out}", "training.max_steps=4", "training.save_steps=2",
           "training.micro_batch_size=4", "training.log_steps=1", "threads=1",
           f"data.target_cache={Path(out).parent / 'targets'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _history(folder):
    return json.loads((Path(folder) / "trainer_state.json").read_text())["history"]


@pytest.fixture(scope="module")
def released_projector(small_zoo, released_projector_factory):
    """LLaVA's released stage 1 (`mm_projector.bin`) sized for the small zoo's CLIP and LM."""
    return released_projector_factory(small_zoo[0] / "clip", small_zoo[0] / "lm", "llava-v1.5-pretrain")


@pytest.fixture(scope="module")
def stage1(small_world, small_zoo, released_projector, tmp_path_factory):
    out = tmp_path_factory.mktemp("minigpt5") / "stage1"
    return out, _run("minigpt5_stage1.py", out, small_world, small_zoo[0], "eval.limit=6",
                     "model.mapper.d_model=32", "model.mapper.ff=64", f"model.init_connector={released_projector[0]}")


@pytest.fixture(scope="module")
def stage2(stage1, small_world, small_zoo):
    out = stage1[0].parent / "stage2"
    return out, _run("minigpt5_stage2.py", out, small_world, small_zoo[0], f"model.init_from={stage1[0]}",
                     "model.mapper.d_model=32", "model.mapper.ff=64", "eval.limit=2", "eval.page_stories=1",
                     "eval.sampling_steps=2", f"data.feature_cache={stage1[0].parent / 'features'}",
                     "training.ds_config=ds_configs/zero3.json", ranks=2)


def test_stage1_carries_the_released_connector_to_its_output(stage1, released_projector):
    out, stdout = stage1
    folder, state = released_projector
    assert f"connector: from {folder} (mm_projector.bin), carried on to stage 2" in stdout
    saved = load_file(out / "connector.safetensors")
    for key, name in (("0.weight", "linear_1.weight"), ("0.bias", "linear_1.bias"), ("2.weight", "linear_2.weight"),
                      ("2.bias", "linear_2.bias")):
        assert torch.equal(saved[name], state[f"model.mm_projector.{key}"]), name
    assert json.loads((out / "mmpeft_config.json").read_text())["connector_from"] == str(folder)


def test_stage1_trains_voken_rows_and_mapper_and_logs_each_loss(stage1, small_zoo):
    out, stdout = stage1
    assert {p.name for p in out.iterdir()} == EXPORT | RUN_REPORT | {"checkpoint-2", "checkpoint-4", "metrics.json"}
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == EXPORT | CHECKPOINT | {"rng_rank0.pt"}
    history = _history(out / "checkpoint-4")
    assert set(history[0]) == {"step", "loss", "text_loss", "image_loss", "caption_loss", "lr", "seconds"}
    for h in history:
        assert abs(h["loss"] - (0.01 * h["text_loss"] + h["image_loss"] + 0.1 * h["caption_loss"])) < 1e-5
    assert history[-1]["text_loss"] < history[0]["text_loss"]  # the voken rows learn to be emitted
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"heldout_diffusion_loss_right", "heldout_diffusion_loss_shuffled"} <= set(metrics)
    assert metrics["skipped"] == {} and "; no record skipped" in stdout
    assert "trainable (voken rows, mapper {'mlp': 'full', 'query': 'full', 'transformer': 'full'})" in stdout

    model, _, _, _ = load_minigpt5(out)
    base = AutoModelForCausalLM.from_pretrained(small_zoo[0] / "lm")
    emb = model.llava.get_input_embeddings()
    rows = emb(torch.arange(base.config.vocab_size + 9))
    old = base.get_input_embeddings().weight
    assert torch.equal(rows[: old.shape[0]], old)  # frozen rows untouched
    mean = old.mean(0)
    assert not torch.allclose(rows[-8:], mean.expand(8, -1))  # the voken rows moved from their start


def test_stage2_on_two_ranks_under_zero3_starts_from_stage1(stage2, stage1):
    out, stdout = stage2
    assert f"voken rows, mapper and connector: from stage 1 at {stage1[0]}" in stdout
    # all earlier steps shown: the largest sample holds 4 images and the vokens, or 5 images (the text task)
    assert re.search(r"data.max_length 192 holds the largest sample before its sentences: \w+ task with [45] image",
                     stdout)
    assert {p.name for p in out.iterdir()} == EXPORT | RUN_REPORT | {"adapter_config.json", "adapter_model.safetensors",
                                                        "checkpoint-2", "checkpoint-4", "metrics.json", "samples"}
    assert {p.name for p in (out / "checkpoint-4").iterdir()} >= {"rng_rank0.pt", "rng_rank1.pt", "mapper.safetensors"}
    history = _history(out / "checkpoint-4")
    assert set(history[0]) == {"step", "loss", "text_loss", "image_loss", "decision_loss", "lr", "seconds"}
    # Four steps on stories move the text loss less than batches differ, so the test checks
    # what trained instead: the mapper's transformer and output moved from stage 1's, its MLP
    # and query (frozen in stage 2) did not, and LoRA's B matrices left zero.
    before, after = load_file(stage1[0] / "mapper.safetensors"), load_file(out / "mapper.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == (not name.startswith(("mlp.", "query."))), name
    lora_b = {k: v for k, v in load_file(out / "llava_adapter" / "adapter_model.safetensors").items()
              if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("voken_emission_where_image", "clip_image_similarity", "clip_image_similarity_shuffled",
                "clip_image_similarity_sd_caption", "clip_text_similarity_guided", "diffusion_loss_right"):
        assert key in metrics
    assert metrics["stories"] == 2 and metrics["skipped"] == {}
    assert 0 <= metrics["told_share"] <= 1 and 0 <= metrics["told_word_f1_shuffled"] <= 1
    page = (out / "samples" / "index.html").read_text()
    assert page.count("<h2>") == 1 and "SD given the true caption" in page

    final, _, _, _ = load_minigpt5(out)
    ckpt, _, _, _ = load_minigpt5(out / "checkpoint-4")
    batch = {"input_ids": torch.tensor([[3, 4, 5] + final.voken_ids]), "attention_mask": torch.ones(1, 11,
                                                                                                      dtype=torch.long)}
    assert torch.allclose(final.mapper(final.voken_states(batch)[0]), ckpt.mapper(ckpt.voken_states(batch)[0]))


def test_stage2_says_when_it_starts_from_scratch(small_world, small_zoo, tmp_path):
    stdout = _run("minigpt5_stage2.py", tmp_path / "scratch", small_world, small_zoo[0], "model.init_from=null",
                  SCRATCH_MAPPER, "model.qlora=true", "training.max_steps=2", "eval.limit=1", "eval.page_stories=1",
                  "eval.sampling_steps=2", "data.feature_cache=null")
    assert "no stage-1 folder given (model.init_from): voken rows, mapper and connector start from scratch" in stdout
    assert "connector: random (neither stage 1 nor model.init_connector gave one), trained here" in stdout
    assert "qlora True" in stdout
    assert json.loads((tmp_path / "scratch" / "metrics.json").read_text())["stories"] == 1


def test_stage2_stops_when_max_length_cannot_hold_a_sample_and_counts_what_it_skips(small_world, small_zoo,
                                                                                     tmp_path):
    common = [f"fixture.world_dir={small_world}", f"fixture.zoo_dir={small_zoo[0]}", "model.init_from=null",
              SCRATCH_MAPPER, "data.feature_cache=null", "eval.stories=null", "threads=1"]
    cache = tmp_path / "targets"
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "minigpt5_stage2.py"), *common,
                           f"training.output_dir={tmp_path / 'short'}", f"data.target_cache={cache}",
                           "data.max_length=40"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    found = re.search(r"data.max_length 40 cannot hold a stage-2 sample with data.history null \(all earlier "
                      r"steps\): (\w+) task with "
                      r"(\d) image\(s\): \2 x (\d+) image tokens \+ (\d) vokens \+ (\d+) template and instruction "
                      r"tokens = (\d+);.* raise data.max_length to at least \6 ", proc.stderr)
    assert found, proc.stderr[-3000:]
    images, per_image, vokens, template, total = map(int, found.groups()[1:])
    assert images * per_image + vokens + template == total
    assert not cache.exists()  # stopped before any target was encoded
    # at exactly the floor every sample with a sentence before its last image is cut: skipped, counted, reported
    stdout = _run("minigpt5_stage2.py", tmp_path / "floor", small_world, small_zoo[0], *common[2:],
                  f"data.max_length={total}", "data.skip_bad_records=true", "training.max_steps=2")
    line = next(x for x in stdout.splitlines() if x.startswith("data: ") or "] data: " in x)
    kept, stories, skipped = map(int, re.search(r"data: (\d+) samples \(image, multimodal, text\) from (\d+) "
                                                r"stories in \S+; skipped (\d+) record\(s\): ", line).groups())
    assert kept > 0 and skipped > 0 and kept + skipped == stories * 13  # the image task at 5 steps, the others at 4
    metrics = json.loads((tmp_path / "floor" / "metrics.json").read_text())
    assert sum(metrics["skipped"].values()) == skipped
    assert all(f"{n} {reason}" in line for reason, n in metrics["skipped"].items())


def test_generate_writes_a_page_for_stories_and_for_a_prompt(stage2, small_world, tmp_path):
    out, _ = stage2
    stories = small_world / "vist/sis/test.story-in-sequence.json"
    images = small_world / "vist/images/test"
    base = [sys.executable, str(ROOT / "recipes" / "minigpt5_generate.py"), str(out), "--steps", "2"]
    proc = subprocess.run(base + ["--stories", str(stories), "--image-folder", str(images), "--limit", "1",
                                  "--out", str(tmp_path / "a" / "index.html")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "a" / "index.html").read_text()
    assert page.count("<h2>") == 1 and "true:" in page
    first = sorted(images.glob("*.jpg"))[0]
    proc = subprocess.run(base + ["--prompt", "What happens next?", "--context", "A red circle.", str(first),
                                  "--out", str(tmp_path / "b" / "index.html")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prompt: " in proc.stdout and (tmp_path / "b" / "index-0-ctx0.png").exists()


def test_mmpeft_load_rebuilds_it_and_the_export_merges_lora_and_voken_rows(stage2, tmp_path):
    from transformers import LlavaForConditionalGeneration

    import mmpeft
    from mmpeft.export import export_run
    from mmpeft.hub import plan_push

    out, _ = stage2
    model, _, _, _ = load_minigpt5(out)
    loaded = mmpeft.load(out)
    batch = {"input_ids": torch.tensor([[3, 4, 5] + model.voken_ids]), "attention_mask": torch.ones(1, 11,
                                                                                                      dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.mapper(loaded.model.voken_states(batch)[0]),
                                   model.mapper(model.voken_states(batch)[0]), rtol=0, atol=0)
        logits = model.llava(**batch).logits
    assert loaded.pipeline is not None
    exported = export_run(out, tmp_path / "export")
    assert {"model.safetensors", "mapper.safetensors", "mmpeft_config.json"} <= {p.name for p in exported.iterdir()}
    native = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(native(**batch).logits, logits, rtol=1e-4, atol=1e-4)
    pushed = {rel for rel, _ in plan_push(out).files}
    assert {"mapper.safetensors", "llava_adapter/adapter_model.safetensors", "metrics.json"} <= pushed
    assert not any(rel.startswith(("samples/", "checkpoint-")) for rel in pushed)
