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


def test_a_zero3_llava_rank_loads_its_shard_of_the_lm_on_the_host():
    lm, vision, connector = _vicuna_7b()
    llava = _settings(zero_stage=3, gpus=8, trainable={"vision": "frozen", "connector": "full", "llm": "lora"})
    whole = plan.memory_plan(lm, vision, connector, replace(llava, zero_stage=2), 80).host["loading"]
    assert whole == (lm.params + vision.params + connector) * 2
    embeddings = lm.vocab * lm.hidden * 2  # untied; rebuilt whole when the image token is added
    shard = (lm.params - embeddings) / 8 + embeddings + vision.params + connector
    assert plan.memory_plan(lm, vision, connector, llava, 80).host["loading"] == int(shard * 2)
    assert plan.memory_plan(lm, vision, connector, replace(llava, qlora=True), 80).host["loading"] == whole


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


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config,parts", [
    ("gill_opt", {"lm": "opt", "clip": "clip224", "diffusion": "sd15"}),
    ("minigpt5_stage1_vicuna", {"lm": "lm", "clip": "clip", "diffusion": "sd21_base"}),
    ("minigpt5_stage2_vicuna", {"lm": "lm", "clip": "clip", "diffusion": "sd21_base"})])
@pytest.mark.parametrize("gpus,memory,verdict", [(8, 80, "fits"), (1, 0.5, "does not fit")])
def test_the_cli_plans_gill_and_minigpt5_from_local_folders(standins, capsys, config, parts, gpus, memory, verdict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    argv = ["plan", f"recipes/configs/{config}.yaml", *(f"model.{k}_path={standins[v]}" for k, v in parts.items()),
            "--gpus", str(gpus), "--gpu-memory", str(memory)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    sd = standins[parts["diffusion"]]
    unet = _count(UNet2DConditionModel.from_pretrained(sd, subfolder="unet"))
    beside = _count(AutoencoderKL.from_pretrained(sd, subfolder="vae"))
    beside += _count(CLIPTextModel.from_pretrained(sd, subfolder="text_encoder"))
    lm = _count(AutoModelForCausalLM.from_pretrained(standins[parts["lm"]]))
    vision = _count(CLIPVisionModel.from_pretrained(standins[parts["clip"]]))
    assert f"parts: LM {lm:,} (" in out
    if config == "gill_opt":  # CLIP and all of Stable Diffusion stay on the host; the frozen OPT is not checkpointed
        assert out.startswith(f"recipes/configs/{config}.yaml: GILL;")
        assert f"on the host CLIP and Stable Diffusion {vision + unet + beside:,};" in out
        assert "in eval mode, so not checkpointed" in out and "UNet activations" not in out
        assert "LM passes a sample: 2 x 48 + 1 x 48 tokens" in out
    else:
        assert out.startswith(f"recipes/configs/{config}.yaml: MiniGPT-5;")
        assert f"vision {vision:,} (frozen)" in out and f"UNet {unet:,} (frozen)" in out
        assert f"on the host VAE and text encoder {beside:,};" in out
        shown = 3072 // 576 if config.endswith("stage2_vicuna") else 0  # stage 1 shows no image
        assert f"a sample: {shown} image(s) of 576 tokens through the tower" in out
        assert "vision activations" not in out  # a frozen tower keeps nothing (mmpeft.train.modes)
    assert re.search(rf"verdict: {verdict} in {memory:g} GiB", out)
    assert ("fits with" in out or "no setting" in out) == (verdict != "fits")


def test_the_cli_names_what_it_cannot_read_or_plan(standins, capsys, tmp_path):
    argv = ["plan", "recipes/configs/minigpt5_stage2_vicuna.yaml", f"model.lm_path={standins['lm']}",
            f"model.clip_path={standins['clip']}", "--gpu-memory", "80"]
    assert main([*argv, "--diffusion-config", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"cannot read the diffusion config from {tmp_path}" in err
    assert "give --diffusion-config (a Stable Diffusion folder with unet/, vae/ and text_encoder/ configs)" in err
    assert main(["plan", "recipes/configs/flamingo_tiny.yaml", "--gpu-memory", "80"]) == 1
    assert "is no LLaVA (model.connector), MiniGPT-5" in capsys.readouterr().err
