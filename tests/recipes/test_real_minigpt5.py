"""MiniGPT-5's real configs (`minigpt5_stage1_vicuna.yaml`, `minigpt5_stage2_vicuna.yaml`:
Vicuna-7B v1.5, CLIP ViT-L/14-336, SD 2.1-base) through their real launch commands for two
steps on the stand-ins (see `mmpeft.standins.build`) and the small world: stage 1 on its
caption shards, stage 2 from stage 1 on its VIST stories, and stage 1 once more on SD 2.1 at
768 px, whose UNet predicts the velocity.

Every setting of the YAMLs stays as it is (bf16 where this CPU has bfloat16 kernels, ZeRO-2,
max_length 128 and 3072, all earlier story steps, vicuna_v1, the paper's mapper at d 1024 with 8 heads, 4 + 4 layers and
ff 4096, the loss weights, the learning rates) except `OVERRIDES`, stage 2's two sampling
steps for its held-out images (`EVAL`, not 50) and the paths: the model folders, the data,
the target cache, the output folders, `model.init_connector` (a folder with LLaVA's
`mm_projector.bin` at the stand-ins' sizes, for the Hub id stage 1's config names) and stage
2's `model.init_from`. The run on SD 2.1 reads one caption shard of three (16 pairs): at
768 px a target image costs about 1.7 s of VAE encoding on one CPU thread. A CPU without
bfloat16 kernels (AVX2 only; `cpu_bf16_slowdown`) runs a bf16 matmul 80-160x slower than a
float32 one, and a two-step run in bf16 would take hours: there the runs add
`training.bf16=false` (the warning the recipes print on such a CPU suggests the same) and
every dtype checked below is float32.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CLIPModel, LlavaProcessor

import mmpeft
from mmpeft.data.conversation import ConversationEncoder
from mmpeft.data.stories import read_vist, sample_shape, story_samples
from mmpeft.data.templates import chat_template
from mmpeft.minigpt5.model import VokenMapper
from mmpeft.standins.build import STANDINS, build_standins
from mmpeft.train.placement import SLOW_BF16, cpu_bf16_slowdown

# CPU only: two steps, two samples a step (not 24 / 6 per GPU), one thread, every step logged
BF16 = cpu_bf16_slowdown() <= SLOW_BF16
DTYPE = torch.bfloat16 if BF16 else torch.float32
OVERRIDES = ("training.max_steps=2", "training.micro_batch_size=2", "threads=1", "training.log_steps=1",
             *(() if BF16 else ("training.bf16=false",)))
EVAL = ("eval.sampling_steps=2",)
RUN_FILES = {"connector.safetensors", "llava_adapter", "mapper.safetensors", "mmpeft_config.json",
             "processor_config.json", "tokenizer.json", "tokenizer_config.json"}
LORA_FILES = {"adapter_config.json", "adapter_model.safetensors"}
STATE_FILES = {"ds", "rng_rank0.pt", "trainer_state.json", "training.png"}
RUN_REPORT = {"metrics.jsonl", "runs", "training.png"}  # mmpeft.train.reporting: metrics, TensorBoard, plot
IMAGE, VOKENS = 32000, list(range(32001, 32009))  # added after Vicuna's 32,000 tokens
UNIFORM_LOSS = math.log(32009)  # random stand-in: about a uniform guess over the vocabulary and the new rows
# the paper's mapper: MLP 64 -> 1024 -> 1024, 77 x 1024 query, 4 encoder layers (attention, ff 4096,
# 2 norms), 4 decoder layers (2 attentions, ff 4096, 3 norms), 2 final norms; out width 1024 = SD 2.1's
MAPPER_PARAMETERS = ((64 * 1024 + 1024) + (1024 * 1024 + 1024) + 77 * 1024 + 4 * (4 * 1024 * 1024 + 4 * 1024)
                     + 4 * (2 * 4 * 1024 * 1024 + 2 * 4 * 1024) + 8 * (2 * 1024 * 4096 + 4096 + 1024)
                     + (4 * 2 + 4 * 3 + 2) * 2 * 1024)
MAPPER = {"llm_hidden": 64, "out_dim": 1024, "n_query": 77, "d_model": 1024, "heads": 8, "encoder_layers": 4,
          "decoder_layers": 4, "ff": 4096, "input_layers": 2}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    used = tuple(s for s in STANDINS if s.key in ("lm", "clip", "sd21_base", "sd21_v"))
    return build_standins(tmp_path_factory.mktemp("standins"), standins=used)


@pytest.fixture(scope="module")
def released_projector(standins, released_projector_factory):
    """LLaVA-1.5's released stage 1 (`mm_projector.bin`) sized for the CLIP and Vicuna stand-ins."""
    return released_projector_factory(standins["clip"], standins["lm"],
                                      "llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5")


def _stage1(run, standins, small_world, released_projector, out, diffusion, shards):
    return run("minigpt5_stage1.py", "minigpt5_stage1_vicuna.yaml", f"model.lm_path={standins['lm']}",
                f"model.clip_path={standins['clip']}", f"model.diffusion_path={standins[diffusion]}",
                f"model.init_connector={released_projector[0]}",
                f"data.train.path={small_world / 'wds/train' / shards}", f"data.target_cache={out.parent / 'targets'}",
                f"training.output_dir={out}", *OVERRIDES)


@pytest.fixture(scope="module")
def stage1(run_shipped_config, standins, small_world, released_projector, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "minigpt5-vicuna-7b-stage1"
    return out, _stage1(run_shipped_config, standins, small_world, released_projector, out, "sd21_base", "*.tar")


@pytest.fixture(scope="module")
def stage2(run_shipped_config, standins, small_world, stage1):
    out = stage1[0].parent / "minigpt5-vicuna-7b-stage2"
    vist = small_world / "vist"
    stdout = run_shipped_config("minigpt5_stage2.py", "minigpt5_stage2_vicuna.yaml", f"model.lm_path={standins['lm']}",
                  f"model.clip_path={standins['clip']}", f"model.diffusion_path={standins['sd21_base']}",
                  f"model.init_from={stage1[0]}", f"data.train.path={vist / 'sis/train.story-in-sequence.json'}",
                  f"data.train.image_folder={vist / 'images/train'}",
                  f"eval.stories={vist / 'sis/test.story-in-sequence.json'}",
                  f"eval.image_folder={vist / 'images/test'}", f"data.target_cache={stage1[0].parent / 'targets'}",
                  f"training.output_dir={out}", *EVAL, *OVERRIDES)
    return out, stdout


def _history(out):
    return json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["history"]


def _load(out, standins, diffusion="sd21_base"):
    return mmpeft.load(out, lm=str(standins["lm"]), clip=str(standins["clip"]), diffusion=str(standins[diffusion]))


@torch.no_grad()
def _implied_condition(out, standins, input_ids, pixel_values=None):
    """The mapped voken conditioning that a run's files imply, computed here without the
    package's loader: the Vicuna stand-in in float32 with the trained voken rows and any LoRA
    (alpha / r x B A) written into its weights; at each `<image>`, CLIP's second-to-last
    layer without its CLS token through the connector; the states that predict each voken
    through the mapper."""
    lm = AutoModelForCausalLM.from_pretrained(standins["lm"], dtype=torch.float32)
    lm.resize_token_embeddings(VOKENS[-1] + 1, mean_resizing=False)
    rows = load_file(out / "llava_adapter" / "adapter_model.safetensors")
    lm.get_input_embeddings().weight[VOKENS] = next(v for k, v in rows.items() if "embed_tokens" in k).float()
    if (out / "adapter_model.safetensors").exists():
        lora = load_file(out / "adapter_model.safetensors")
        config = json.loads((out / "adapter_config.json").read_text())
        for name in config["target_modules"]:
            a, b = (lora[f"base_model.model.{name}.lora_{x}.weight"].float() for x in "AB")
            lm.get_submodule(name).weight += config["lora_alpha"] / config["r"] * b @ a
    embeds = lm.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        tower = CLIPModel.from_pretrained(standins["clip"], dtype=torch.float32).vision_model
        features = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        c = {k: v.float() for k, v in load_file(out / "connector.safetensors").items()}
        projected = F.linear(F.gelu(F.linear(features, c["linear_1.weight"], c["linear_1.bias"])),
                             c["linear_2.weight"], c["linear_2.bias"])
        embeds[input_ids == IMAGE] = projected.reshape(-1, embeds.shape[-1])
    hidden = lm.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
    start = input_ids[0].tolist().index(VOKENS[0])
    mapper = VokenMapper(**json.loads((out / "mmpeft_config.json").read_text())["mapper"])
    mapper.load_state_dict(load_file(out / "mapper.safetensors"))
    return mapper(hidden[:, start - 1:start + len(VOKENS) - 1])


def _reload_gives_the_implied_outputs(out, standins, input_ids, pixel_values=None):
    loaded = _load(out, standins)
    model = loaded.model
    # every part in float32, not Vicuna's published float16 beside CLIP's and SD's float32
    assert {p.dtype for p in model.parameters()} | {p.dtype for p in loaded.pipeline.vae.parameters()} == {
        torch.float32}
    saved = load_file(out / "mapper.safetensors")
    assert sum(t.numel() for t in saved.values()) == MAPPER_PARAMETERS
    assert {k: torch.equal(v.float(), saved[k].float()) for k, v in model.mapper.state_dict().items()} == {
        k: True for k in saved}
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    with torch.no_grad():
        condition = model.mapper(model.voken_states(batch)[0])
    assert condition.shape == (1, 77, 1024)  # SD 2.1's text conditioning
    torch.testing.assert_close(condition, _implied_condition(out, standins, input_ids, pixel_values),
                               rtol=1e-4, atol=1e-4)
    return loaded


def _connector_in_llava_names(state):
    return {f"linear_{1 + int(k.split('.')[2]) // 2}.{k.rsplit('.', 1)[1]}": v for k, v in state.items()}


def test_stage1_vicuna_config_trains_vokens_and_the_paper_sized_mapper(stage1, standins, small_world,
                                                                       released_projector):
    out, stdout = stage1
    assert f"connector: from {released_projector[0]} (mm_projector.bin), carried on to stage 2" in stdout
    assert (f"diffusion: {standins['sd21_base']} at 512 px; the loss regresses the noise (prediction_type epsilon)"
            in stdout)
    assert f"data: 40 caption pairs from {small_world / 'wds/train/*.tar'}; no record skipped\n" in stdout
    assert "warning: training.bf16" not in stdout  # bf16 only where this CPU computes it at speed
    assert {p.name for p in out.iterdir()} == RUN_FILES | RUN_REPORT | {"checkpoint-2", "metrics.json"}
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == RUN_FILES | STATE_FILES
    history = _history(out)
    assert len(history) == 2 and set(history[0]) == {"step", "loss", "text_loss", "image_loss", "caption_loss",
                                                     "lr", "seconds"}
    for h in history:
        assert abs(h["text_loss"] - UNIFORM_LOSS) < 0.5
        assert h["loss"] == pytest.approx(0.01 * h["text_loss"] + h["image_loss"] + 0.1 * h["caption_loss"], rel=1e-4)
    settings = json.loads((out / "mmpeft_config.json").read_text())
    config = settings["config"]
    assert (config["data"]["max_length"], config["data"]["conversation_format"]) == (128, "vicuna_v1")
    assert config["training"]["bf16"] is BF16 and config["training"]["ds_config"] == "ds_configs/zero2.json"
    assert settings["mapper"] == MAPPER and settings["prediction_type"] == "epsilon"
    assert json.loads((out / "metrics.json").read_text())["skipped"] == {}
    # LLaVA's released projector, in LLaVA's names, carried into the run at the dtype it trained in
    assert settings["connector_from"] == str(released_projector[0])
    saved = load_file(out / "connector.safetensors")
    expected = _connector_in_llava_names(released_projector[1])
    assert saved.keys() == expected.keys() and saved["linear_1.weight"].shape == (64, 64)
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor.to(DTYPE)), name


def test_stage1_reloads_in_one_call_with_the_outputs_its_files_imply(stage1, standins):
    out, _ = stage1
    ids = LlavaProcessor.from_pretrained(out).tokenizer("Draw this: a red circle").input_ids
    loaded = _reload_gives_the_implied_outputs(out, standins, torch.tensor([ids + VOKENS]))
    rows = load_file(out / "llava_adapter" / "adapter_model.safetensors")
    head = next(v for k, v in rows.items() if "lm_head" in k).float()
    hidden = torch.randn(1, 1, 64)
    with torch.no_grad():  # the trained head rows score the vokens
        logits = loaded.model.llava.get_output_embeddings()(hidden)[0, 0]
    torch.testing.assert_close(logits[VOKENS], hidden[0, 0] @ head.T, rtol=1e-5, atol=1e-5)


def test_stage2_vicuna_config_shows_every_earlier_step_within_3072_tokens(stage2, stage1, small_world):
    out, stdout = stage2
    assert f"voken rows, mapper and connector: from stage 1 at {stage1[0]}" in stdout
    # all earlier steps: the text task at the last step holds 5 images of 576 tokens
    assert ("data.max_length 3072 holds the largest sample before its sentences: text task with 5 image(s): "
            "5 x 576 image tokens + 0 vokens + 61 template and instruction tokens = 2941") in stdout
    train = small_world / "vist/sis/train.story-in-sequence.json"
    stories = read_vist(train, small_world / "vist/images/train")
    assert f"data: {13 * len(stories)} samples (image, multimodal, text) from {len(stories)} stories in {train}; " \
           "no record skipped\n" in stdout  # each 5-step story: the image task at 5 steps, the others at 4
    # with their sentences, every sample fits whole: none was cut at max_length
    processor = LlavaProcessor.from_pretrained(out)
    encoder = ConversationEncoder(processor.tokenizer, processor.image_processor,
                                  chat_template(processor.tokenizer, "vicuna_v1"), "<image>", 576, 10 ** 6)
    data = json.loads((out / "mmpeft_config.json").read_text())["config"]["data"]
    samples = [s for sid, steps in stories.items()
               for s in story_samples(sid, steps, data["prompts"], data["tasks"], data["history"])]
    longest = max(sample_shape(encoder, VOKENS, s, "").tokens for s in samples)
    assert 2941 < longest <= 3072

    assert {p.name for p in out.iterdir()} == RUN_FILES | LORA_FILES | RUN_REPORT | {"checkpoint-2", "metrics.json",
                                                                                   "samples"}
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == RUN_FILES | LORA_FILES | STATE_FILES
    history = _history(out)
    assert len(history) == 2 and set(history[0]) == {"step", "loss", "text_loss", "image_loss", "lr", "seconds"}
    assert [h["lr"] for h in history] == pytest.approx([2e-5, 0.0])  # 4.6% of 2 steps: no warmup, linear decay
    for h in history:
        assert abs(h["text_loss"] - UNIFORM_LOSS) < 0.5
        assert h["loss"] == pytest.approx(0.01 * h["text_loss"] + h["image_loss"], rel=1e-4)
    settings = json.loads((out / "mmpeft_config.json").read_text())
    config = settings["config"]
    assert (config["data"]["max_length"], config["data"]["history"]) == (3072, None)
    assert config["training"]["bf16"] is BF16 and config["training"]["ds_config"] == "ds_configs/zero2.json"
    assert settings["mapper"] == MAPPER and settings["prediction_type"] == "epsilon"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (8, 16, 0.05)
    assert sorted(adapter["target_modules"]) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    # the held-out figures ran on the reloaded model (in the dtype it trained in) over the 2 test stories
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stories"] == 2 and metrics["skipped"] == {}
    assert all(math.isfinite(metrics[k]) for k in ("diffusion_loss_right", "clip_image_similarity"))
    assert (out / "samples" / "index.html").read_text().count("<h2>") == 2


def test_stage2_keeps_the_released_connector_and_trains_the_mapper_transformer(stage2, stage1, released_projector):
    out, _ = stage2
    assert json.loads((out / "mmpeft_config.json").read_text())["connector_from"] == str(stage1[0])
    saved = load_file(out / "connector.safetensors")
    for name, tensor in _connector_in_llava_names(released_projector[1]).items():
        assert torch.equal(saved[name], tensor.to(DTYPE)), name  # frozen: stage 1's, to the bit
    before, after = load_file(stage1[0] / "mapper.safetensors"), load_file(out / "mapper.safetensors")
    assert before.keys() == after.keys()
    for name in before:  # the MLP and query frozen, the transformer trained
        moved = not torch.equal(before[name], after[name])
        if name.startswith(("mlp.", "query.")):
            assert not moved, name
        elif BF16 and ".norm" in name and name.endswith(".weight"):
            # LayerNorm gains sit at 1, where bf16's spacing (2 ** -7) exceeds the one update of lr 2e-5
            # (the second step's lr is 0); the float32 master copy moved, the bf16 weights saved did not
            assert torch.all(after[name] == 1), name
        else:
            assert moved, name


def test_stage2_reloads_in_one_call_with_the_outputs_its_files_imply(stage2, standins):
    out, _ = stage2
    processor = LlavaProcessor.from_pretrained(out)
    pixels = processor.image_processor(Image.new("RGB", (300, 200), "red"), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 336, 336)
    # an earlier step's image, its sentence, then the vokens: the connector, LoRA and voken rows all count
    sentence = processor.tokenizer("A red circle.", add_special_tokens=False).input_ids
    ids = torch.tensor([[processor.tokenizer.bos_token_id] + [IMAGE] * 576 + sentence + VOKENS])
    _reload_gives_the_implied_outputs(out, standins, ids, pixels)


def test_stage1_on_sd21_at_768_px_regresses_the_velocity(run_shipped_config, standins, small_world,
                                                         released_projector, tmp_path):
    out = tmp_path / "minigpt5-vicuna-7b-stage1-sd21-v"
    stdout = _stage1(run_shipped_config, standins, small_world, released_projector, out, "sd21_v", "00000.tar")
    assert (f"diffusion: {standins['sd21_v']} at 768 px; the loss regresses the velocity "
            "(prediction_type v_prediction)") in stdout
    assert "data: 16 caption pairs" in stdout and "no record skipped" in stdout
    settings = json.loads((out / "mmpeft_config.json").read_text())
    assert settings["prediction_type"] == "v_prediction" and settings["mapper"] == MAPPER  # same widths as 2.1-base
    line = next(line for line in stdout.splitlines() if " target images to encode in " in line)
    shards = sorted(Path(line.removeprefix("cache ").split(": ", 1)[0]).glob("shard-*.safetensors"))
    assert len(shards) == 1  # 16 latents make one shard
    latents = load_file(shards[0])["features"]
    assert latents.shape == (16, 4, 96, 96) and latents.dtype == DTYPE  # 768 px through the VAE, in the run's dtype
    history = _history(out)
    assert len(history) == 2 and all(abs(h["text_loss"] - UNIFORM_LOSS) < 0.5 for h in history)
    loaded = _load(out, standins, "sd21_v")
    scheduler = loaded.model.noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction" and loaded.model.unet.config.sample_size == 96
    with pytest.raises(ValueError, match="trained against the v_prediction target, but the Stable Diffusion at "
                                         f"{standins['sd21_base']} predicts epsilon"):
        _load(out, standins, "sd21_base")
