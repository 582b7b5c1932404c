"""The Flamingo recipe run as users run it, for a few steps on the small world and zoo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpeft.flamingo.checkpoint import load_flamingo

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.resampler_options={latents: 4, layers: 1, heads: 2, head_width: 16}",
         "model.xattn_options={every: 2, heads: 2, head_width: 16}"]


@pytest.fixture(scope="module")
def run(small_world, small_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("flamingo") / "out"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", str(ROOT / "recipes" / "flamingo.py"),
           f"fixture.world_dir={small_world}", f"fixture.zoo_dir={small_zoo[0]}", f"training.output_dir={out}",
           "training.max_steps=4", "training.save_steps=2", "training.micro_batch_size=4", "training.log_steps=1",
           "eval.limit=6", "threads=1", f"data.feature_cache={out.parent / 'features'}",
           f"data.prepared={out.parent / 'prepared'}", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_trains_only_the_resampler_and_gates_and_writes_its_files(run):
    out, stdout = run
    assert "2 gated cross-attention layers, before decoder layers [0, 2]" in stdout
    assert "answer accuracy on 6 held-out questions" in stdout
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        assert {"flamingo.safetensors", "mmpeft_config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    weights = load_file(out / "flamingo.safetensors")
    assert {k.split(".")[0] for k in weights} == {"resampler", "xattn"}
    assert all(weights[f"xattn.{i}.attn_gate"].abs().item() > 0 for i in (0, 1))  # the gates left 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"answer_accuracy_before", "answer_accuracy_after", "chance", "gates"} <= set(metrics)


def test_a_checkpoint_reloads_in_one_call_and_reads_its_images(run):
    out, _ = run
    model, tokenizer, image_processor, settings = load_flamingo(out / "checkpoint-2")
    assert settings["xattn_options"]["every"] == 2
    saved = load_file(out / "checkpoint-2" / "flamingo.safetensors")
    assert torch.equal(model.xattn[1].attn_gate.detach(), saved["xattn.1.attn_gate"])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[image_id] + tokenizer("What colour is it?")["input_ids"]])
    pixels = image_processor(images=[torch.zeros(3, 64, 64), torch.ones(3, 64, 64)], return_tensors="pt",
                             do_rescale=False)["pixel_values"]
    with torch.no_grad():
        a = model(ids, pixel_values=pixels[:1]).logits
        b = model(ids, pixel_values=pixels[1:]).logits
    assert (a - b).abs().max() > 0  # the answer depends on the image
    with pytest.raises(FileNotFoundError, match="not a Flamingo output"):
        load_flamingo(out / "checkpoint-2" / "ds")


def test_mmpeft_load_rebuilds_it_and_a_push_sends_the_trained_parts_with_a_card(run):
    from huggingface_hub import ModelCard

    import mmpeft
    from mmpeft.hub import model_card, plan_push

    out, _ = run
    loaded = mmpeft.load(out)
    direct, tokenizer, _, _ = load_flamingo(out)
    ids = torch.tensor([[tokenizer.convert_tokens_to_ids("<image>")] + tokenizer("Red?")["input_ids"]])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids, pixel_values=pixels).logits, direct(ids, pixel_values=pixels).logits)
    assert loaded.processor.tokenizer.convert_tokens_to_ids("<image>") == ids[0, 0]
    plan = plan_push(out)
    sent = {f for f, _ in plan.files}
    assert {"flamingo.safetensors", "mmpeft_config.json", "metrics.json", "tokenizer.json"} <= sent
    assert not any(f.startswith("checkpoint-") for f in sent)
    card = ModelCard(str(model_card(plan, "someone/flamingo-tiny")))
    assert card.data.pipeline_tag == "image-text-to-text" and "flamingo" in card.data.tags
