"""LLaVA-1.5-7B's real configs run through their real launch command for two steps, on the
stand-ins of Vicuna-7B v1.5, CLIP ViT-L/14-336 and llava-hf/llava-1.5-7b-hf (see
`mmpeft.standins.build`) and the small world's data.

Every setting of the YAML stays as it is (bf16, ZeRO-2 / ZeRO-3, max_length 2048, the plain
and vicuna_v1 formats, LoRA r 128 on all linear layers, the learning rates) except
`OVERRIDES` and the paths: the model folders, the data, the output folder and stage 2's
stage-1 connector, which on a cluster are the YAML's relative paths.
"""

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

import mmpeft
from mmpeft.export import export_run
from mmpeft.standins.build import build_standins

# CPU only: two steps, two samples a step (not 32 / 16 per GPU), one thread, every step logged
OVERRIDES = ("training.max_steps=2", "training.micro_batch_size=2", "threads=1", "training.log_steps=1")
RUN_FILES = {"connector.safetensors", "mmpeft_config.json", "processor_config.json", "tokenizer.json",
             "tokenizer_config.json"}
LORA_FILES = {"adapter_config.json", "adapter_model.safetensors", "llava_adapter"}
STATE_FILES = {"ds", "rng_rank0.pt", "trainer_state.json", "training.png"}
RUN_REPORT = {"metrics.jsonl", "runs", "training.png"}  # mmpeft.train.reporting: metrics, TensorBoard, plot
UNIFORM_LOSS = math.log(32001)  # random stand-ins: about the loss of a uniform guess over the vocabulary


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return build_standins(tmp_path_factory.mktemp("standins"))


@pytest.fixture(scope="module")
def pretrain_data(small_world, tmp_path_factory):
    """The small world's images in blip_laion_cc_sbu_558k.json's shape: one human turn with
    the image, one caption."""
    records = json.loads((small_world / "llava/train.json").read_text())
    rows = [{"id": r["id"], "image": r["image"], "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": r["conversations"][-1]["value"]}]} for r in records if "image" in r][:16]
    path = tmp_path_factory.mktemp("pretrain_data") / "blip_laion_cc_sbu_558k.json"
    path.write_text(json.dumps(rows))
    return path


def _losses(out):
    return [h["loss"] for h in json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["history"]]


@pytest.fixture(scope="module")
def stage1(run_shipped_config, standins, pretrain_data, small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "llava-1.5-7b-pretrain"
    stdout = run_shipped_config("llava_pretrain.py", "llava_pretrain_7b.yaml", f"model.lm_path={standins['lm']}",
                                f"model.clip_path={standins['clip']}", f"data.train.path={pretrain_data}",
                                f"data.train.image_folder={small_world / 'coco'}", f"training.output_dir={out}",
                                *OVERRIDES)
    return out, stdout


@pytest.fixture(scope="module")
def stage2(run_shipped_config, standins, stage1, small_world):
    out = stage1[0].parent / "llava-1.5-7b-lora"
    stdout = run_shipped_config("llava_finetune.py", "llava_finetune_7b.yaml", f"model.lm_path={standins['lm']}",
                                f"model.clip_path={standins['clip']}", f"model.init_connector={stage1[0]}",
                                f"data.train.path={small_world / 'llava/train.json'}",
                                f"data.train.image_folder={small_world / 'coco'}", f"training.output_dir={out}",
                                *OVERRIDES)
    return out, stdout


def test_pretrain_7b_config_trains_the_connector_and_reloads(stage1, standins):
    out, stdout = stage1
    assert "data: 16 samples" in stdout and "skipped" not in stdout
    assert "trainable ({'vision': 'frozen', 'connector': 'full', 'llm': 'frozen'})" in stdout
    assert {p.name for p in out.iterdir()} == RUN_FILES | RUN_REPORT | {"checkpoint-2", "metrics.json"}
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == RUN_FILES | STATE_FILES
    losses = _losses(out)
    assert len(losses) == 2 and all(abs(loss - UNIFORM_LOSS) < 0.5 for loss in losses)
    settings = json.loads((out / "mmpeft_config.json").read_text())
    assert settings["config"]["data"]["max_length"] == 2048 and settings["config"]["training"]["bf16"] is True
    assert settings["config"]["training"]["ds_config"] == "ds_configs/zero2.json"
    loaded = mmpeft.load(out, lm=str(standins["lm"]), clip=str(standins["clip"]))
    saved = load_file(out / "connector.safetensors")
    connector = loaded.model.model.multi_modal_projector.state_dict()
    assert saved.keys() == connector.keys() and saved["linear_1.weight"].shape == (64, 64)
    for name, tensor in saved.items():
        assert torch.equal(connector[name].to(tensor.dtype), tensor), name


def test_finetune_7b_config_trains_lora_r128_reloads_and_exports_a_native_llava(stage2, standins, small_world,
                                                                               tmp_path):
    out, stdout = stage2
    assert "connector: from stage 1" in stdout and "qlora False" in stdout
    assert "gradient checkpointing: " in stdout  # on in the real configs, as LLaVA trains
    records = len(json.loads((small_world / "llava/train.json").read_text()))
    assert f"data: {records} conversations from {small_world / 'llava/train.json'}\n" in stdout  # none skipped
    assert {p.name for p in out.iterdir()} == RUN_FILES | LORA_FILES | RUN_REPORT | {"checkpoint-2", "metrics.json"}
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == RUN_FILES | LORA_FILES | STATE_FILES
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (128, 256, 0.05)
    targets = adapter["target_modules"]  # every linear layer of the LM's 2 blocks, not its head
    assert len(targets) == 14 and {t.rsplit(".", 1)[-1] for t in targets} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    losses = _losses(out)
    assert len(losses) == 2 and all(abs(loss - UNIFORM_LOSS) < 0.5 for loss in losses)
    loaded = mmpeft.load(out, lm=str(standins["lm"]), clip=str(standins["clip"]))

    exported = export_run(out, tmp_path / "export", lm=str(standins["lm"]), clip=str(standins["clip"]))
    native = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    processor = AutoProcessor.from_pretrained(exported)
    assert native.config.image_seq_length == 576 and native.config.image_token_id == 32000
    text = "USER: <image>\nWhat colour is the circle? ASSISTANT:"
    inputs = processor(images=Image.new("RGB", (300, 200), "red"), text=text, return_tensors="pt")
    assert (inputs.input_ids == 32000).sum() == 576
    with torch.no_grad():
        merged, unmerged = native(**inputs).logits, loaded.model(**inputs).logits.float()
    # the export keeps the base's dtype (Vicuna's float16), every part of it
    assert {p.dtype for p in native.parameters()} == {torch.float16}
    torch.testing.assert_close(merged.float(), unmerged, rtol=0, atol=2e-2)

    # through transformers' pipeline with typed chat messages, as a server sends them: the
    # export's own chat template makes LLaVA-1.5's prompt, and greedy decoding continues it
    from transformers import pipeline

    image = Image.new("RGB", (300, 200), "red")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What colour is the circle?"}]}]
    served = pipeline("image-text-to-text", model=str(exported))(
        text=messages, return_full_text=False, generate_kwargs={"max_new_tokens": 4, "do_sample": False})
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("USER: <image>\nWhat colour is the circle? ASSISTANT:")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        greedy = native.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs.input_ids.shape[1]:]
    ours = processor.decode(greedy, skip_special_tokens=True)
    assert len(greedy) == 4 and served[0]["generated_text"].strip() == ours.strip() != ""


def test_from_llava15_config_starts_from_the_llava_hf_standin(run_shipped_config, standins, small_world, tmp_path):
    out = tmp_path / "from-llava-hf"
    stdout = run_shipped_config("llava_finetune.py", "llava_finetune_from_llava15_7b.yaml",
                                f"model.init_from={standins['llava']}",
                                f"data.train.path={small_world / 'llava/train.json'}",
                                f"data.train.image_folder={small_world / 'coco'}", f"training.output_dir={out}",
                                *OVERRIDES)
    assert f"model: from {standins['llava']}, its image token '<image>' and vision_feature_layer -2" in stdout
    assert all(abs(loss - UNIFORM_LOSS) < 0.5 for loss in _losses(out))
    loaded = mmpeft.load(out)
    assert loaded.model.config.text_config.vocab_size == 32064 and loaded.settings["sources"] == {
        "llava": str(standins["llava"])}
