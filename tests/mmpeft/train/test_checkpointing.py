"""Gradient checkpointing: the same losses and gradients, and less saved for backward."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmpeft.models.trainable import LoraSettings, apply_trainability
from mmpeft.train.modes import enable_gradient_checkpointing

ROOT = Path(__file__).resolve().parents[3]


def _lora_lm():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    return apply_trainability(lm, {"llm": lm.model}, {"llm": "lora"}, LoraSettings(r=4, alpha=8, dropout=0.0))


def _step(model):
    """Loss, LoRA gradients and the bytes autograd saved for backward outside checkpoints."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, sum(saved)


def test_checkpointing_keeps_loss_and_gradients_and_saves_less():
    plain = _step(_lora_lm())
    model = _lora_lm()
    assert enable_gradient_checkpointing(model) == ["PeftModelForCausalLM"]
    checkpointed = _step(model)
    assert checkpointed[0] == plain[0]
    assert plain[1].keys() == checkpointed[1].keys() and len(plain[1]) == 56  # LoRA A and B: 7 linears x 4 layers
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=1e-5, atol=1e-7)
    assert checkpointed[2] < plain[2] / 2  # most of the activations are recomputed, not kept


_RUN = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from mmpeft.models.trainable import LoraSettings, apply_trainability
from mmpeft.train.loop import TrainConfig, train

torch.manual_seed(0)
lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
lm = apply_trainability(lm, {"llm": lm.model}, {"llm": "lora"}, LoraSettings(r=4, alpha=8, dropout=0.1))
gen = torch.Generator().manual_seed(2)
data = [{"input_ids": torch.randint(0, 64, (24,), generator=gen)} for _ in range(16)]
cfg = TrainConfig(output_dir=sys.argv[2], max_steps=4, micro_batch_size=4, lr=1e-2, warmup_ratio=0.0,
                  gradient_checkpointing=sys.argv[1] == "on", ds_config=None)
collate = lambda rows: {"input_ids": torch.stack([r["input_ids"] for r in rows]),
                        "labels": torch.stack([r["input_ids"] for r in rows])}
history = train(lm, data, collate, cfg, forward=lambda engine, batch: {"loss": engine(**batch).loss},
                export=lambda folder, is_main: None, lengths=[24] * 16, has_image=[False] * 16)
print(json.dumps([h["loss"] for h in history]))
"""


def test_the_loop_gives_the_same_loss_curve_with_checkpointing(tmp_path):
    curves = {}
    for mode in ("off", "on"):
        proc = subprocess.run([sys.executable, "-c", _RUN, mode, str(tmp_path / mode)], capture_output=True,
                              text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert ("gradient checkpointing: PeftModelForCausalLM" in proc.stdout) == (mode == "on")
    assert len(curves["on"]) == 4 and len(set(curves["on"])) == 4  # four different batches and weights
    # LoRA dropout on: the recomputed forward draws the same masks (the RNG state is replayed)
    assert curves["on"] == pytest.approx(curves["off"], rel=1e-5)


def test_frozen_parts_without_dropout_stay_in_train_mode_under_checkpointing():
    from transformers import CLIPVisionConfig, CLIPVisionModel, OPTConfig, OPTForCausalLM

    from mmpeft.train.modes import mode_dependent, parts_in_eval

    llama = _lora_lm().base_model.model
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=32, dropout=0.1))
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=16, patch_size=8))
    assert [mode_dependent(m) for m in (llama, opt, tower)] == [False, True, False]
    assert mode_dependent(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    assert parts_in_eval([llama, opt, tower], checkpointing=True) == [opt]  # OPT's dropout must stay off
    assert parts_in_eval([llama, opt, tower], checkpointing=False) == [llama, opt, tower]


def test_a_frozen_lm_the_loss_passes_through_is_checkpointed_and_a_frozen_tower_keeps_nothing():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mmpeft.llava.model import build_llava, llava_parts
    from mmpeft.models.trainable import frozen_modules
    from mmpeft.train.modes import parts_in_eval, train_mode

    def stage1(checkpointing):  # LLaVA's stage 1: tower and LM frozen, the connector trains
        torch.manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
        tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=16, patch_size=8))
        model = build_llava(tower, lm, 63)
        choice = {"vision": "frozen", "connector": "full", "llm": "frozen"}
        parts = llava_parts(model)
        model = apply_trainability(model, parts, choice)
        if checkpointing:
            enable_gradient_checkpointing(model)
        train_mode(model, parts_in_eval(frozen_modules(parts, choice), checkpointing))
        return model, parts["vision"]

    ids = torch.randint(0, 60, (2, 40), generator=torch.Generator().manual_seed(1))
    ids[:, 1:5] = 63  # four patches of a 16 px image
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    def kept(checkpointing):
        model, tower = stage1(checkpointing)
        flows, saved = [], []
        tower.register_forward_hook(lambda m, i, out: flows.append(out.last_hidden_state.requires_grad))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
        assert flows == [False]  # no gradient into the frozen tower, so it keeps no activation
        return sum(saved)

    assert kept(True) < kept(False) / 2  # the frozen LM's layers are recomputed, not kept
