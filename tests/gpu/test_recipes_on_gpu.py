"""Every recipe on one GPU for a few steps, its evaluation and generation included, on the
small world and zoo: what the CPU suite cannot show (a tensor left on the CPU while the
model is on the GPU, bf16 on real kernels). Skipped without CUDA; run with
`pytest tests/gpu` on a GPU machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[2]
COMMON = ("training.max_steps=2", "training.save_steps=2", "training.micro_batch_size=4", "training.log_steps=1",
          "training.bf16=true")


def _run(script: str, out: Path, world: Path, zoo: Path, *overrides: str) -> str:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", str(ROOT / "recipes" / script),
           f"fixture.world_dir={world}", f"fixture.zoo_dir={zoo}", f"training.output_dir={out}", *COMMON, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())
    return proc.stdout


def test_llava_stages_train_and_answer_on_the_gpu(small_world, small_zoo, tmp_path):
    _run("llava_pretrain.py", tmp_path / "stage1", small_world, small_zoo[0], "eval.limit=8")
    stdout = _run("llava_finetune.py", tmp_path / "stage2", small_world, small_zoo[0], "eval.limit=8",
                  f"model.init_connector={tmp_path / 'stage1'}", "training.gradient_checkpointing=true")
    assert "held-out questions" in stdout


def test_llava_zero3_loads_partitioned_and_qlora_trains_on_the_gpu(small_world, small_zoo, tmp_path):
    stdout = _run("llava_finetune.py", tmp_path / "zero3", small_world, small_zoo[0], "eval.limit=8",
                  "model.init_connector=null", "training.ds_config=ds_configs/zero3.json")
    assert "LM: loaded partitioned over 1 rank(s)" in stdout
    _run("llava_finetune.py", tmp_path / "qlora", small_world, small_zoo[0], "eval.limit=8",
         "model.init_connector=null", "model.qlora=true")


def test_minigpt5_stages_evaluate_and_generate_on_the_gpu(small_world, small_zoo, released_projector_factory,
                                                          tmp_path):
    projector = released_projector_factory(small_zoo[0] / "clip", small_zoo[0] / "lm", "llava-v1.5-pretrain")
    mapper = ("model.mapper.d_model=32", "model.mapper.ff=64", f"data.target_cache={tmp_path / 'targets'}")
    _run("minigpt5_stage1.py", tmp_path / "stage1", small_world, small_zoo[0], "eval.limit=4", *mapper,
         f"model.init_connector={projector[0]}")
    stdout = _run("minigpt5_stage2.py", tmp_path / "stage2", small_world, small_zoo[0], *mapper,
                  f"model.init_from={tmp_path / 'stage1'}", "eval.limit=2", "eval.page_stories=1",
                  "eval.sampling_steps=2")
    assert "held-out stories" in stdout
    page = subprocess.run([sys.executable, str(ROOT / "recipes" / "minigpt5_generate.py"), str(tmp_path / "stage2"),
                           "--stories", str(small_world / "vist" / "sis" / "test.story-in-sequence.json"),
                           "--image-folder", str(small_world / "vist" / "images" / "test"), "--limit", "2",
                           "--steps", "2", "--out", str(tmp_path / "page" / "index.html")],
                          capture_output=True, text=True)
    assert page.returncode == 0, page.stderr[-3000:]


def test_gill_general_gpt_and_flamingo_evaluate_on_the_gpu(small_world, small_zoo, tmp_path):
    _run("gill.py", tmp_path / "gill", small_world, small_zoo[0], f"data.target_cache={tmp_path / 'targets'}",
         "model.mapper.d_model=32", "model.mapper.ff=64", "eval.limit=8", "eval.generate=2", "eval.sampling_steps=2",
         "eval.decision.prompts=16", "eval.decision.steps=5")
    gill = tmp_path / "gill"
    answer = subprocess.run([sys.executable, str(ROOT / "recipes" / "gill_answer.py"), str(gill), "--index",
                             str(gill / "index"), "--prompt", "There is a large red square at the top left.",
                             "--force-image", "--steps", "2", "--out", str(tmp_path / "page" / "index.html")],
                            capture_output=True, text=True)
    assert answer.returncode == 0, answer.stderr[-3000:]
    _run("general_gpt.py", tmp_path / "general_gpt", small_world, small_zoo[0], "eval.limit=10", "eval.captions=3",
         "eval.max_new_tokens=4", f"data.embedding_cache={tmp_path / 'embeddings'}")
    _run("flamingo.py", tmp_path / "flamingo", small_world, small_zoo[0], "eval.limit=8")
