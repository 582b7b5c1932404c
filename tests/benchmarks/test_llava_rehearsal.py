"""benchmarks/llava_rehearsal.py: its FLOP count against a hand count, the model it builds,
its data, and the whole script at the tiny shape on CPU."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def rehearsal(monkeypatch):
    """The benchmark script as a module (it imports its neighbours in benchmarks/)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("llava_rehearsal")


def test_training_flops_match_a_hand_count(rehearsal):
    from transformers import CLIPVisionConfig, LlamaConfig

    lm = LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=16, vocab_size=10)
    vision = CLIPVisionConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                              image_size=28, patch_size=14)
    counts = rehearsal.shape_counts(lm, vision, lora_r=2)
    # LM: q, k, v, o 4 x 8x8, gate and up 2 x 8x16, down 16x8; LoRA r 2: 2 x (in + out) each
    assert counts["lm_linear"] == 4 * 64 + 2 * 128 + 128 == 640
    assert counts["lora"] == 4 * 2 * 16 + 2 * 2 * 24 + 2 * 24 == 272
    # tower: q, k, v, out 4 x 4x4, fc1 4x8, fc2 8x4, patch convolution 3x14x14 -> 4; 2x2 patches + class token
    assert counts["vision_linear"] == 64 + 32 + 32 + 3 * 14 * 14 * 4 == 2480
    assert (counts["vision_positions"], counts["image_tokens"], counts["connector"]) == (5, 4, 4 * 8 + 8 * 8)
    flops = rehearsal.training_flops(12, **counts)
    assert flops == {
        "lm_linear": 4 * 640 * 12,            # 2N forward + 2N input gradients, per token
        "lora": 6 * 272 * 12,
        "attention": 12 * 12 * 12 * 8 * 1,    # (4 forward + 8 backward) x seq x hidden x layers, per token
        "lm_head": 4 * 10 * 8 * 12,
        "vision": 2 * 2480 * 5 + 4 * 5 * 5 * 4 * 1,
        "connector": 6 * 96 * 4,
    }
    assert sum(flops.values()) == 95472


def test_peak_table_reads_the_device_name(rehearsal):
    peaks = {name: rehearsal.peak_tflops(name) for name in (
        "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S",
        "NVIDIA A10G", "NVIDIA GeForce RTX 4090")}
    assert list(peaks.values()) == [989.0, 756.0, 989.0, 312.0, 362.0, 70.0, None]


def test_7b_shape_is_llava_15_7b_and_built_where_asked(rehearsal):
    model = rehearsal.build_model("7b", torch.device("meta"), torch.bfloat16)
    params = list(model.parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params)
    # Llama-2-7B (6,738,415,616 at 32,000 tokens) plus the image token's two rows, CLIP ViT-L/14-336's tower
    # (303,507,456) and the mlp2x_gelu connector (20,979,712)
    assert sum(p.numel() for p in params) == 6_738_415_616 + 2 * 4096 + 303_507_456 + 20_979_712
    assert (model.config.image_seq_length, model.config.vision_feature_layer, model.config.image_token_id) == (
        576, -2, 32000)
    assert model.model.language_model.config._attn_implementation == "sdpa"


def test_synthetic_conversations_hold_one_image_and_label_the_answer(rehearsal):
    data = rehearsal.synthetic_conversations(2, 20, 4, 99, 50, 28)
    row = data[1]
    ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
    assert ids.shape == (20,) and (ids == 99).sum() == 4 and (ids[1:5] == 99).all()
    assert ((ids >= 0) & (ids < 50))[5:].all()
    # 15 text tokens after the image: the last 7 are the answer
    assert (labels[:13] == -100).all() and torch.equal(labels[13:], ids[13:])
    assert row["pixel_values"].shape == (1, 3, 28, 28) and row["pixel_values"].dtype == torch.float32
    again = rehearsal.synthetic_conversations(2, 20, 4, 99, 50, 28)[1]
    assert again["input_ids"] == row["input_ids"] and torch.equal(again["pixel_values"], row["pixel_values"])
    assert data[0]["input_ids"] != row["input_ids"]


def test_tokens_per_second_leaves_out_the_warm_up(rehearsal):
    times = [10.0, 12.0, 13.0, 14.0, 15.0]  # the first step slow
    assert rehearsal.tokens_per_second(times, 100, warmup=1) == 100 * 4 / 5
    assert rehearsal.tokens_per_second(times, 100, warmup=3) == 100 * 2 / 2
    assert rehearsal.tokens_per_second(times, 100, warmup=9) == 100 * 2 / 2  # at most all but two


def test_the_script_runs_both_sides_on_cpu(tmp_path):
    out = tmp_path / "rehearsal.json"
    proc = subprocess.run([sys.executable, "benchmarks/llava_rehearsal.py", "--steps", "3", "--repeats", "1",
                           "--threads", "1", "--output", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["shape"] == "tiny" and result["settings"]["dtype"] == "float32"
    # LoRA r 128 on 2 layers of (q, k, v, o at 64 -> 64, gate and up 64 -> 128, down 128 -> 64) and the connector
    lora = 2 * 128 * (4 * 128 + 2 * 192 + 192)
    assert result["trainable"] == {"mmpeft": lora + 6272, "trl": lora + 6272}
    assert result["plan"]["trainable"] == lora + 6272 and result["plan"]["total"] > 0
    for side in ("mmpeft", "trl"):
        assert result["tokens_per_second"][side] > 0 and result["peak_bytes"][side] > 0
        assert result["mfu"][side] is None
        losses = result["runs"][side][0]["losses"]
        # random weights: the loss is near uniform over the 512 text tokens and the image token
        assert len(losses) == 3 and abs(losses[0] - math.log(513)) < 0.2
    assert result["met"]["mfu"] is None and result["peak_tflops"] is None
    assert result["ratio"] == pytest.approx(result["tokens_per_second"]["mmpeft"] / result["tokens_per_second"]["trl"])
    assert "not applicable on CPU" in proc.stdout
