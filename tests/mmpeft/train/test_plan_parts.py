"""The GILL and MiniGPT-5 parts of the memory plan against what a training step on small
models keeps: parameters exactly, each part's activations within a quarter of what autograd
saves for backward."""

import gc
import weakref
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from mmpeft.gill import plan as gill_plan
from mmpeft.gill.model import GILL, DecisionHead, ImageInput, RetrievalHead
from mmpeft.llava.model import build_llava, llava_parts
from mmpeft.minigpt5 import plan as minigpt5_plan
from mmpeft.minigpt5.model import MiniGPT5, VokenMapper, mapper_parts
from mmpeft.models.trainable import LoraSettings, apply_trainability, frozen_modules
from mmpeft.models.vokens import trainable_token_targets
from mmpeft.train import plan, plan_parts
from mmpeft.train.modes import enable_gradient_checkpointing, parts_in_eval, train_mode

VOCAB, HIDDEN, CLIP_DIM, SEQ, BATCH = 512, 128, 48, 64, 2
VOKENS = list(range(VOCAB - 8, VOCAB))
IMAGE_TOKEN = VOCAB - 9
MAPPER = dict(d_model=64, heads=4, encoder_layers=2, decoder_layers=2, ff=256)
LORA = LoraSettings(r=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"])
CPU_MASK_BYTES = 2  # the CPU's dropout keeps its mask in the input's dtype (bf16 here), CUDA's in a bool
# Stable Diffusion's UNet layout (SD 2.x: linear projections, heads by level; SD 1.x: convolutions) at small widths
UNET = dict(in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(32, 64, 128, 128),
            layers_per_block=2, norm_num_groups=32, sample_size=16, cross_attention_dim=96)
SD2 = dict(UNET, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True)
SD1 = dict(UNET, attention_head_dim=8, use_linear_projection=False)
VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TEXT = CLIPTextConfig(vocab_size=100, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=77,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _settings(**changes):
    base = dict(gpus=1, micro_batch_size=BATCH, grad_accum=1, max_length=SEQ, gradient_checkpointing=False,
                dtype_bytes=2, zero_stage=0, offload_param=False, offload_optimizer=False, qlora=False, lora_r=LORA.r,
                lora_dropout=LORA.dropout, lora_targets=tuple(LORA.targets), trainable={"llm": "frozen"},
                new_token_rows=len(VOKENS))
    return plan.Settings(**{**base, **changes})


def _saved_by_part(model, parts: dict, step) -> dict[str, int]:
    """Bytes autograd keeps for backward outside checkpoints, each storage once, weights left
    out, by the innermost of `parts` (name: module) running when saved ("rest": none). Only
    what is still held when the forward ends counts: a checkpoint saves its inputs even where
    no gradient will flow (a frozen tower), and frees them with the graph that never forms."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    running, saved, hooks = ["rest"], {}, []

    def enter(name):
        return lambda module, args: running.append(name)

    def leave(module, args, output):
        running.pop()

    for name, module in parts.items():
        hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in saved:
            saved[storage.data_ptr()] = (running[-1], storage.nbytes(), weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    gc.collect()
    held = [(name, nbytes) for name, nbytes, ref in saved.values() if ref() is not None]
    loss.backward()
    for hook in hooks:
        hook.remove()
    out = dict.fromkeys(parts, 0) | {"rest": 0}
    for name, nbytes in held:
        out[name] += nbytes
    return out


def _diffusion(unet: dict = SD2):
    return plan_parts.diffusion_sizes(UNet2DConditionModel(**unet).config, AutoencoderKL(**VAE).config, TEXT)


def _assert_tensors_match_the_plan(model, p: plan.Plan):
    params = list(model.parameters())
    assert p.trainable_params == sum(t.numel() for t in params if t.requires_grad)
    assert p.gpu["weights"] == sum(t.numel() * t.element_size() for t in params)


def test_stable_diffusion_parameters_are_counted_exactly():
    sizes = _diffusion(SD1)
    built = UNet2DConditionModel(**SD1), AutoencoderKL(**VAE), CLIPTextModel(TEXT)
    assert (sizes.unet, sizes.vae, sizes.text_encoder) == tuple(sum(p.numel() for p in m.parameters()) for m in built)
    assert (sizes.context, sizes.width, sizes.latent) == (77, 96, 16)
    assert [b.kind for b in sizes.blocks].count("transformer") == 3 * 2 + 1 + 3 * 3


@pytest.mark.parametrize("layout", ["sd2", "sd1"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_unet_activations_are_within_a_quarter_of_what_autograd_saves(layout, checkpointing):
    config = SD2 if layout == "sd2" else SD1
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(torch.bfloat16).eval().requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    latents = torch.randn(BATCH, 4, 16, 16, dtype=torch.bfloat16)
    condition = torch.randn(BATCH, 77, 96, dtype=torch.bfloat16, requires_grad=True)  # the mapped vokens
    step = lambda: unet(latents, torch.tensor([10, 500]), encoder_hidden_states=condition).sample.float().mean()  # noqa: E731
    measured = _saved_by_part(unet, {}, step)["rest"]
    sizes = _diffusion(config)
    planned = plan_parts.unet_activation_bytes(sizes, BATCH, 2, checkpointing)
    if checkpointing:  # the recomputed block lives only inside backward, where the hooks are not set
        planned -= plan_parts.unet_recompute_bytes(sizes, BATCH, 2)
    assert planned == pytest.approx(measured, rel=0.25)


def _gill(llm: str):
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=4 * HIDDEN, num_hidden_layers=3,
                       num_attention_heads=4, word_embed_proj_dim=HIDDEN, max_position_embeddings=256, dropout=0.1)
    lm = OPTForCausalLM(config)
    mapper = VokenMapper(HIDDEN, 96, 77, **MAPPER, input_layers=1)
    model = GILL(lm, ImageInput(CLIP_DIM, HIDDEN, 4), RetrievalHead(HIDDEN, CLIP_DIM, 32), mapper,
                 DecisionHead(HIDDEN), IMAGE_TOKEN, VOKENS)
    rows = {name: VOKENS for name in trainable_token_targets(lm).values()}
    parts, choice = {"llm": lm.base_model}, {"llm": llm}
    model.lm = apply_trainability(lm, parts, choice, replace(LORA, targets="all-linear"), token_rows=rows)
    model.decision.requires_grad_(False)
    model.to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds every weight
    train_mode(model, frozen_modules(parts, choice))
    return model, config


def _gill_batch():
    g = torch.Generator().manual_seed(1)
    caption = torch.randint(4, VOCAB - 16, (BATCH, 2 * SEQ), generator=g)  # two captions joined
    caption[:, 1:5] = IMAGE_TOKEN
    image = torch.randint(4, VOCAB - 16, (BATCH, SEQ), generator=g)
    image[:, -9:-1] = torch.tensor(VOKENS)
    return dict(input_ids=caption, attention_mask=torch.ones_like(caption), labels=caption,
                clip_embeds=torch.randn(BATCH, CLIP_DIM, generator=g), img_input_ids=image,
                img_attention_mask=torch.ones_like(image), img_labels=image,
                target_clip=torch.randn(BATCH, CLIP_DIM, generator=g), caption_embeds=torch.randn(BATCH, 77, 96))


@pytest.mark.parametrize("llm", ["frozen", "lora"])
def test_a_gill_step_keeps_what_the_plan_says(llm):
    model, config = _gill(llm)
    lm = plan.lm_sizes(config)
    clip = plan.VisionSizes(1000, CLIP_DIM, 0)
    parts = gill_plan.gill_parts(lm, clip, _diffusion(), MAPPER, len(VOKENS), 4, 32, joined_captions=True)
    s = _settings(trainable={"llm": llm}, lora_targets="all-linear")
    p = plan.memory_plan(lm, plan.VisionSizes(0, 0, 0), 0, s, 100, parts)
    _assert_tensors_match_the_plan(model, p)
    measured = _saved_by_part(model, {"lm": model.lm, "layers": model.lm.get_decoder(), "mapper": model.mapper},
                              lambda: model(**_gill_batch())["loss"])
    planned = parts.activations(lm, s, CPU_MASK_BYTES)
    assert planned["LM activations"] == pytest.approx(measured["layers"], rel=0.25)
    assert planned["logits"] == pytest.approx(measured["lm"], rel=0.25)
    assert planned["mapper activations"] == pytest.approx(measured["mapper"], rel=0.25)
    assert sum(planned.values()) == pytest.approx(sum(measured.values()), rel=0.25)


def _minigpt5(llm: str, mapper_trainable: dict, checkpointing: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=344, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    vision_config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)
    llava = build_llava(CLIPVisionModel(vision_config), LlamaForCausalLM(config), IMAGE_TOKEN)
    rows = {name: VOKENS for name in trainable_token_targets(llava).values()}
    parts, choice = llava_parts(llava), {"vision": "frozen", "connector": "frozen", "llm": llm}
    llava = apply_trainability(llava, parts, choice, LORA, token_rows=rows)
    unet = UNet2DConditionModel(**SD2).requires_grad_(False)
    mapper = VokenMapper(HIDDEN, 96, 77, **MAPPER)
    for part, module in mapper_parts(mapper).items():
        module.requires_grad_(mapper_trainable[part] == "full")
    model = MiniGPT5(llava, mapper, unet, DDPMScheduler(), VOKENS, torch.zeros(77, 96), cfg_rate=0.0)
    model.to(torch.bfloat16)
    if checkpointing:
        enable_gradient_checkpointing(model)
    frozen = [*frozen_modules(parts, choice), *frozen_modules(mapper_parts(mapper), mapper_trainable), unet]
    train_mode(model, parts_in_eval(frozen, checkpointing))  # as the loop runs them
    return model, config, vision_config, choice


def _minigpt5_batch(images: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB - 16, (BATCH, SEQ), generator=g)
    ids[:, 1:1 + 16 * images] = IMAGE_TOKEN  # 16 patches a 32 px image
    ids[:, -10:-2] = torch.tensor(VOKENS)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                 target_latents=torch.randn(BATCH, 4, 16, 16, generator=g).bfloat16(),
                 caption_embeds=torch.randn(BATCH, 77, 96, generator=g))
    if images:
        batch["pixel_values"] = torch.randn(BATCH * images, 3, 32, 32, generator=g).bfloat16()
    return batch


STAGE1 = ("frozen", {"mlp": "full", "query": "full", "transformer": "full"}, 0)
STAGE2 = ("lora", {"mlp": "frozen", "query": "frozen", "transformer": "full"}, 1)


@pytest.mark.parametrize("stage,checkpointing", [
    pytest.param(STAGE1, False, id="stage1"), pytest.param(STAGE1, True, id="stage1-checkpointing"),
    pytest.param(STAGE2, False, id="stage2"), pytest.param(STAGE2, True, id="stage2-checkpointing")])
def test_a_minigpt5_step_keeps_what_the_plan_says(stage, checkpointing):
    llm, mapper_trainable, images = stage
    model, config, vision_config, choice = _minigpt5(llm, mapper_trainable, checkpointing)
    lm, vision, diffusion = plan.lm_sizes(config), plan.vision_sizes(vision_config), _diffusion()
    connector = plan.connector_params("mlp2x_gelu", vision.hidden, lm.hidden)
    parts = minigpt5_plan.minigpt5_parts(lm, vision, diffusion, MAPPER, mapper_trainable, len(VOKENS), images)
    s = _settings(trainable=choice, gradient_checkpointing=checkpointing)
    p = plan.memory_plan(lm, vision, connector, s, 100, parts)
    _assert_tensors_match_the_plan(model, p)
    llava = model.llava_model
    watched = {"lm": llava, "layers": llava.model.language_model, "vision": llava.model.vision_tower,
               "connector": llava.model.multi_modal_projector, "mapper": model.mapper, "unet": model.unet}
    measured = _saved_by_part(model, watched, lambda: model(**_minigpt5_batch(images))["loss"])
    planned = parts.activations(lm, s, CPU_MASK_BYTES)
    if checkpointing:  # what backward recomputes, where the hooks are not set
        planned["LM activations"] -= plan_parts.lm_layer_bytes(lm, SEQ, BATCH, s, CPU_MASK_BYTES)
    if checkpointing:
        planned["UNet activations"] -= plan_parts.unet_recompute_bytes(diffusion, BATCH, 2)
    assert planned["LM activations"] == pytest.approx(measured["layers"], rel=0.25)
    assert planned["logits"] == pytest.approx(measured["lm"], rel=0.25)
    assert planned.get("vision activations", 0) == pytest.approx(measured["vision"] + measured["connector"], rel=0.25)
    assert planned["mapper activations"] == pytest.approx(measured["mapper"], rel=0.25)
    assert planned["UNet activations"] == pytest.approx(measured["unet"], rel=0.25)
    assert sum(planned.values()) == pytest.approx(sum(measured.values()), rel=0.25)
