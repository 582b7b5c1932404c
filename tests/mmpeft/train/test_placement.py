import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpeft.train.placement import (
    SLOW_BF16,
    partitioned_loading,
    rank_device,
    slow_bf16_warning,
    zero3_loading_config,
)

ROOT = Path(__file__).resolve().parents[3]
# torch's own kernels and oneDNN's held to AVX2, as on a CPU without AVX-512: no bfloat16 kernels
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_each_rank_evaluates_on_its_own_gpu():
    assert rank_device({"LOCAL_RANK": "3"}, cuda=True) == torch.device("cuda", 3)
    assert rank_device({}, cuda=True) == torch.device("cuda", 0)  # a plain `python` run: the first GPU
    assert rank_device({"LOCAL_RANK": "3"}, cuda=False) == torch.device("cpu")


def test_only_zero3_without_quantization_loads_partitioned(tmp_path):
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    training = {"output_dir": str(tmp_path), "max_steps": 1, "micro_batch_size": 2}
    assert zero3_loading_config({**training, "ds_config": str(ROOT / "ds_configs" / "zero2.json")}) is None
    assert zero3_loading_config({**training, "ds_config": str(ROOT / "ds_configs" / "zero3.json")},
                                quantized=True) is None  # bitsandbytes quantizes while loading
    config = zero3_loading_config({**training, "ds_config": str(ROOT / "ds_configs" / "zero3.json")})
    assert config["zero_optimization"]["stage"] == 3 and config["train_micro_batch_size_per_gpu"] == 2
    with partitioned_loading(config) as partitioned:
        assert partitioned and is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()  # a reload on one rank after training loads whole
    with partitioned_loading(None) as partitioned:
        assert not partitioned and not is_deepspeed_zero3_enabled()


_RANK = """
import json, os, sys, torch
rank, folder, zoo, ds, port = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
import deepspeed
from mmpeft.llava.model import add_image_token, load_base_models
from mmpeft.presets import resolve_preset
from mmpeft.train.loop import setup_distributed
from mmpeft.train.placement import full_numel, partitioned_loading, zero3_loading_config

setup_distributed()  # as every recipe's start does
zero3 = zero3_loading_config({"output_dir": folder, "max_steps": 1, "ds_config": ds})
lm, tokenizer, vision, _ = load_base_models(resolve_preset("tiny", zoo_dir=zoo), zero3=zero3, log=lambda _: None)
held = sum(p.ds_tensor.numel() for p in lm.parameters())
whole = sum(full_numel(p) for p in lm.parameters())
whole_before = [n for n, p in lm.named_parameters() if p.numel()]
with partitioned_loading(zero3):
    image_id = add_image_token(tokenizer, lm)
embedding = lm.get_input_embeddings().weight
with deepspeed.zero.GatheredParameters([embedding]):
    row, mean = embedding[image_id].tolist(), embedding[:image_id].float().mean(0).tolist()
    rows = embedding.shape[0]
whole_after = [n for n, p in lm.named_parameters() if p.numel()]
json.dump({"held": held, "whole": whole, "whole_before": whole_before, "whole_after": whole_after,
           "vision_whole": all(not hasattr(p, "ds_id") for p in vision.parameters()),
           "row": row, "mean": mean, "rows": rows, "vocab": len(tokenizer)}, open(f"{folder}/rank{rank}.json", "w"))
torch.distributed.destroy_process_group()
"""


def test_zero3_loads_each_rank_s_shard_of_the_lm_and_adds_tokens_across_ranks(two_ranks, small_zoo):
    from mmpeft.presets import load_lm, resolve_preset

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    results = two_ranks(_RANK, lambda r: [str(small_zoo[0]), str(ROOT / "ds_configs" / "zero3.json"), port])
    whole = sum(p.numel() for p in load_lm(resolve_preset("tiny", zoo_dir=small_zoo[0]))[0].parameters())
    for r in results:
        assert r["whole_before"] == [] and r["vision_whole"]  # the LM's parameters are shards; the tower is whole
        # transformers builds a resized embedding whole (its shape is read elsewhere); the engine partitions it
        assert r["whole_after"] == ["model.embed_tokens.weight", "lm_head.weight"]
        assert r["whole"] == whole and 0 < r["held"] <= whole / 2 + 64  # each rank holds half, up to padding
        assert r["rows"] == r["vocab"]  # the embedding grew by the image token, across the shards
        assert r["row"] == pytest.approx(r["mean"], abs=1e-6)  # its row started at the mean of the trained ones
    assert results[0]["row"] == results[1]["row"]


class _FakeCuda:
    """torch.cuda as a machine with GPUs would answer, recording set_device."""

    def __init__(self, available: bool):
        self.available, self.current = available, None

    def is_available(self) -> bool:
        return self.available

    def set_device(self, device) -> None:
        self.current = device


def test_each_rank_makes_its_own_gpu_current_before_any_collective(monkeypatch):
    from mmpeft.train.loop import use_rank_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    gpu = _FakeCuda(True)
    assert use_rank_device(gpu) == torch.device("cuda", 3) and gpu.current == torch.device("cuda", 3)
    cpu = _FakeCuda(False)
    assert use_rank_device(cpu) == torch.device("cpu") and cpu.current is None


def test_bf16_without_cuda_on_a_cpu_without_bfloat16_kernels_is_warned_about_and_kept():
    def never():
        raise AssertionError("measured where it does not matter")

    warning = slow_bf16_warning({"bf16": True}, cuda=False, slowdown=lambda: 82.4)
    assert warning.startswith("warning: training.bf16 on a CPU without bfloat16 kernels")
    assert "takes 82x as long as a float32 one" in warning and warning.endswith("add training.bf16=false")
    assert slow_bf16_warning({"bf16": True}, cuda=False, slowdown=lambda: SLOW_BF16) is None  # a CPU with them
    assert slow_bf16_warning({"bf16": True}, cuda=True, slowdown=never) is None
    assert slow_bf16_warning({"bf16": False, "fp16": False}, cuda=False, slowdown=never) is None
    assert slow_bf16_warning({}, cuda=False, slowdown=never) is None


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 limits apply to x86 CPUs")
def test_a_recipe_start_on_a_cpu_held_to_avx2_warns_about_the_shipped_bf16():
    script = ("import os; from mmpeft.start import start_run; "
              "cfg, *_ = start_run('recipes/configs/minigpt5_stage1_vicuna.yaml', ['threads=1'], dict(os.environ)); "
              "print('bf16 kept:', cfg['training']['bf16'])")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **AVX2_ONLY, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = next(line for line in proc.stdout.splitlines() if line.startswith("warning: training.bf16"))
    ratio = float(warning.split("takes ")[1].split("x as long")[0])
    assert ratio > SLOW_BF16, warning
    assert "bf16 kept: True" in proc.stdout  # warned, not changed
