"""The memory plan against measurement on small models, and at Vicuna-7B's real sizes."""

import re
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from mmpeft.cli import main
from mmpeft.models.trainable import LoraSettings, apply_trainability
from mmpeft.train import plan

SMALL = dict(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
NO_VISION = plan.VisionSizes(0, 0, 0)


def _settings(**changes):
    base = dict(gpus=1, micro_batch_size=2, grad_accum=1, max_length=128, gradient_checkpointing=False, dtype_bytes=2,
                zero_stage=0, offload_param=False, offload_optimizer=False, qlora=False, lora_r=8, lora_dropout=0.0,
                lora_targets="all-linear", trainable={"llm": "lora"})
    return plan.Settings(**{**base, **changes})


def _lora_lm(dropout):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**SMALL, attn_implementation="sdpa"))
    model = apply_trainability(lm, {"llm": lm.model}, {"llm": "lora"}, LoraSettings(r=8, alpha=16, dropout=dropout))
    return model.to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds every weight, LoRA's too


def _saved_bytes(model, ids):
    """Bytes autograd keeps for backward outside checkpoints: each storage once, weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(saved.values())


def test_parameters_gradients_and_optimizer_states_match_the_tensors():
    model = _lora_lm(0.0)
    sizes = plan.lm_sizes(LlamaConfig(**SMALL))
    p = plan.memory_plan(sizes, NO_VISION, 0, _settings(), 100)
    trainable = [t for t in model.parameters() if t.requires_grad]
    assert p.trainable_params == sum(t.numel() for t in trainable) == 3 * 8 * (4 * 256 + 3 * 472)
    assert p.gpu["weights"] == sum(t.numel() * t.element_size() for t in model.parameters())
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert p.gpu["gradients"] == sum(t.grad.numel() * t.grad.element_size() for t in trainable)
    masters = [t.detach().float().requires_grad_() for t in trainable]  # mixed precision: float32 copies step
    for master, t in zip(masters, trainable, strict=True):
        master.grad = t.grad.float()
    optimizer = torch.optim.AdamW(masters, lr=1e-3)
    optimizer.step()
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim())
    assert p.gpu["optimizer"] == states + sum(m.numel() * m.element_size() for m in masters)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_are_within_a_quarter_of_what_autograd_saves(checkpointing, dropout):
    model = _lora_lm(dropout)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(1))
    measured = _saved_bytes(model, ids)
    sizes = plan.lm_sizes(LlamaConfig(**SMALL))
    s = _settings(gradient_checkpointing=checkpointing, lora_dropout=dropout)
    p = plan.memory_plan(sizes, NO_VISION, 0, s, 100)
    planned = p.gpu["activations"] + p.gpu["logits"]
    if checkpointing:  # the recomputed layer lives only inside backward, where the hooks are not set
        planned -= plan.activation_bytes(sizes, 128, 2, 2, dropout)
    assert planned == pytest.approx(measured, rel=0.25)


def _vicuna_7b():
    lm = plan.lm_sizes(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False))
    vision = plan.vision_sizes(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                num_attention_heads=16, image_size=336, patch_size=14))
    return lm, vision, plan.connector_params("mlp2x_gelu", vision.hidden, lm.hidden)


def test_vicuna_7b_fits_8_x_80_with_zero3_and_checkpointing_but_not_1_x_24():
    lm, vision, connector = _vicuna_7b()
    assert lm.params == 6_738_415_616 and vision.image_tokens == 576
    assert lm.params * 2 / plan.GIB == pytest.approx(12.55, abs=0.01)
    llava = _settings(micro_batch_size=16, max_length=2048, gradient_checkpointing=True, zero_stage=3, lora_r=128,
                      lora_dropout=0.05, trainable={"vision": "frozen", "connector": "full", "llm": "lora"})
    big = plan.memory_plan(lm, vision, connector, replace(llava, gpus=8), 80)
    assert big.fits and big.gpu["weights"] < (lm.params + vision.params) * 2 / 8 + 2 * plan.GIB
    assert not plan.memory_plan(lm, vision, connector, replace(llava, gradient_checkpointing=False, gpus=8), 80).fits
    small = plan.memory_plan(lm, vision, connector, llava, 24)
    assert not small.fits
    options = [" ".join(plan.overrides(llava, o.settings)) for o in plan.suggestions(lm, vision, connector, llava, 24)]
    assert any("qlora" in o or "offload" in o for o in options)
    assert "model.qlora=true training.micro_batch_size=8 training.grad_accum=2" in options
    quantized = plan.memory_plan(lm, vision, connector, replace(llava, qlora=True), 24)
    assert quantized.gpu["weights"] < small.gpu["weights"] / 2.5  # 4-bit linears, 16-bit head, embeddings, vision


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    from mmpeft.standins.build import build_standins

    return build_standins(tmp_path_factory.mktemp("standins"))


@pytest.mark.parametrize("gpus,memory,verdict", [(8, 80, "fits"), (1, 0.5, "does not fit")])
def test_the_cli_plans_llava_finetune_7b_from_local_folders(standins, capsys, gpus, memory, verdict):
    argv = ["plan", "recipes/configs/llava_finetune_7b.yaml", f"model.lm_path={standins['lm']}",
            f"model.clip_path={standins['clip']}", "--gpus", str(gpus), "--gpu-memory", str(memory)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lm = AutoModelForCausalLM.from_pretrained(standins["lm"])
    vision = CLIPVisionModel.from_pretrained(standins["clip"])
    vh, th = vision.config.hidden_size, lm.config.hidden_size
    total = sum(p.numel() for m in (lm, vision) for p in m.parameters()) + vh * th + th * th + 2 * th
    assert f"{total:,} parameters" in out
    assert f"{gpus} GPU(s), ZeRO-3" in out
    assert re.search(rf"verdict: {verdict} in {memory:g} GiB", out)
    assert ("fits with" in out or "no setting" in out) == (verdict != "fits")
