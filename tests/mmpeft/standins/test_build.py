"""LLaVA-1.5-7B's stand-in repositories: real configs cut in depth and width, real Llama-2
tokenizer, loadable with transformers' Auto classes and mmpeft's loaders."""

import json
import time

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
)

from mmpeft.cli import main
from mmpeft.standins.build import Standin, build_standins

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def folders(cache):
    return build_standins(cache / "standins")


def test_vicuna_standin_keeps_vicuna_v15_config_but_depth_and_width(folders):
    config = AutoConfig.from_pretrained(folders["lm"])
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert (config.vocab_size, config.max_position_embeddings, config.rms_norm_eps) == (32000, 4096, 1e-5)
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.hidden_act == "silu"
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads) == (64, 172, 2, 4, 4)
    lm = AutoModelForCausalLM.from_pretrained(folders["lm"])
    assert not config.tie_word_embeddings
    assert not torch.equal(lm.get_input_embeddings().weight, lm.get_output_embeddings().weight)
    with safe_open(folders["lm"] / "model.safetensors", "pt") as f:  # published in float16
        assert f.get_tensor("lm_head.weight").dtype == torch.float16
    generation = GenerationConfig.from_pretrained(folders["lm"])
    assert (generation.do_sample, generation.temperature, generation.top_p) == (True, 0.9, 0.6)
    cut = json.loads((folders["lm"] / "standin.json").read_text())["cut"]
    assert cut["hidden_size"] == {"real": 4096, "standin": 64} and cut["num_hidden_layers"]["real"] == 32


def test_vicuna_standin_tokenizer_is_llama2s_with_vicunas_settings(folders):
    tokenizer = AutoTokenizer.from_pretrained(folders["lm"])
    assert tokenizer("USER:")["input_ids"] == [1, 3148, 1001, 29901]
    assert tokenizer("Hello world")["input_ids"] == [1, 15043, 3186]
    assert tokenizer("a</s>USER", add_special_tokens=False)["input_ids"] == [263, 2, 11889]
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert len(tokenizer) == 32000 and tokenizer.model_max_length == 4096
    assert tokenizer.pad_token is None  # as Vicuna v1.5 publishes it
    saved = json.loads((folders["lm"] / "tokenizer_config.json").read_text())
    assert (saved["add_bos_token"], saved["add_eos_token"], saved["legacy"]) == (True, False, False)


def test_mmpeft_base_loader_gives_the_padless_vicuna_standin_unk_padding(folders):
    from mmpeft.llava.model import load_base_models
    from mmpeft.presets import resolve_preset

    preset = resolve_preset("llava-1.5-7b", lm=str(folders["lm"]), clip=str(folders["clip"]))
    lm, tokenizer, vision, image_processor = load_base_models(preset, log=lambda _: None)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<unk>", 0)
    assert next(lm.parameters()).dtype == torch.float32 and vision.config.image_size == 336


def test_clip_standin_gives_577_tokens_for_a_336_image_with_clips_preprocessing(folders):
    from mmpeft.presets import load_clip, resolve_preset

    assert type(AutoModel.from_pretrained(folders["clip"])).__name__ == "CLIPModel"
    clip, processor = load_clip(resolve_preset("llava-1.5-7b", clip=str(folders["clip"])), log=lambda _: None)
    assert type(processor).__name__ == "CLIPProcessor"
    vision = clip.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_act) == (336, 14, "quick_gelu")
    assert (clip.config.text_config.vocab_size, clip.config.text_config.max_position_embeddings) == (49408, 77)
    pixels = processor(images=Image.new("RGB", (500, 400), (128, 64, 255)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 336, 336)
    expected = [(v / 255 - m) / s for v, m, s in zip((128, 64, 255), CLIP_MEAN, CLIP_STD, strict=True)]
    torch.testing.assert_close(pixels[0, :, 100, 100], torch.tensor(expected), rtol=0, atol=1e-5)
    with torch.no_grad():
        assert clip.vision_model(pixel_values=pixels).last_hidden_state.shape == (1, 577, 64)
    ids = processor.tokenizer(["a photo of a cat", "word " * 100], padding=True, truncation=True).input_ids
    assert ids[0] == [49406, 320, 1125, 539, 320, 2368] + [49407] * 71 and len(ids[1]) == 77  # CLIP's real ids
    assert "CLIP's real one" in (folders["clip"] / "README.md").read_text()


def test_llava_hf_standin_has_llava_15s_structure_and_its_parts(folders):
    from mmpeft.llava.released import load_released_llava

    config = AutoConfig.from_pretrained(folders["llava"])
    assert (config.image_token_id, config.image_seq_length, config.text_config.vocab_size) == (32000, 576, 32064)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy, config.projector_hidden_act) == (
        -2, "default", "gelu")
    assert config.vision_config.image_size == 336 and not config.text_config.tie_word_embeddings
    model = AutoModelForImageTextToText.from_pretrained(folders["llava"], dtype=torch.float32)
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features, projector.linear_2.out_features) == (
        64, 64, 64)
    vicuna = AutoModelForCausalLM.from_pretrained(folders["lm"], dtype=torch.float32)
    clip = AutoModel.from_pretrained(folders["clip"])
    embeddings = model.get_input_embeddings().weight
    assert torch.equal(embeddings[:32000], vicuna.get_input_embeddings().weight)
    torch.testing.assert_close(embeddings[32000:], embeddings[:32000].mean(0).expand(64, -1), rtol=0, atol=1e-3)
    assert torch.equal(model.model.vision_tower.embeddings.position_embedding.weight,
                       clip.vision_model.embeddings.position_embedding.weight.half().float())

    processor = AutoProcessor.from_pretrained(folders["llava"])
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is shown? ASSISTANT:"
    inputs = processor(images=Image.new("RGB", (400, 300)), text=prompt, return_tensors="pt")
    assert (inputs.input_ids == 32000).sum() == 576 and inputs.pixel_values.shape == (1, 3, 336, 336)
    with torch.no_grad():
        assert model(**inputs).logits.shape == (1, inputs.input_ids.shape[1], 32064)

    released, released_processor = load_released_llava(str(folders["llava"]), log=lambda _: None)
    assert released.config.image_token_id == 32000 and released_processor.tokenizer.pad_token_id == 32001


def test_second_build_reuses_the_folders_and_the_cli_prints_them(folders, cache, capsys):
    assert list(folders) == ["lm", "clip", "llava", "clip224", "sd21_base", "sd21_v", "sd15", "opt"]
    assert {k: str(v.relative_to(cache / "standins")) for k, v in folders.items()} == {
        "lm": "lmsys/vicuna-7b-v1.5", "clip": "openai/clip-vit-large-patch14-336",
        "llava": "llava-hf/llava-1.5-7b-hf", "clip224": "openai/clip-vit-large-patch14",
        "sd21_base": "stabilityai/stable-diffusion-2-1-base", "sd21_v": "stabilityai/stable-diffusion-2-1",
        "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "opt": "facebook/opt-6.7b"}
    stamps = {f: (f / "standin.json").stat().st_mtime_ns for f in folders.values()}
    start = time.time()
    assert build_standins(cache / "standins") == folders
    assert main(["standins", "--cache", str(cache)]) == 0
    assert time.time() - start < 2
    assert {f: (f / "standin.json").stat().st_mtime_ns for f in folders.values()} == stamps
    assert capsys.readouterr().out.splitlines() == [f"{k}: {v}" for k, v in folders.items()]


def test_a_table_whose_stand_in_takes_a_later_one_is_refused_before_building(tmp_path):
    table = (Standin("sd15", "a/b", lambda folder, full_size, cache, clip: None, takes=("clip224",)),
             Standin("clip224", "c/d", lambda folder, full_size, cache: None),
             Standin("clip224", "c/d", lambda folder, full_size, cache: None))
    with pytest.raises(ValueError) as err:
        build_standins(tmp_path, standins=table)
    assert str(err.value) == ("stand-in table: 'sd15' takes 'clip224', which is not built before it; "
                              "key 'clip224' appears twice; c/d appears twice")
    assert list(tmp_path.iterdir()) == []


def test_each_stand_in_gets_the_models_it_takes_from_earlier_ones(tmp_path):
    seen = []

    def make(name):
        def build(folder, full_size, cache, *taken):
            seen.append((name, full_size, cache, taken))
            folder.mkdir(parents=True)
            return f"{name}-model"
        return build

    table = (Standin("a", "x/a", make("a")), Standin("b", "x/b", make("b")),
             Standin("c", "x/c", make("c"), takes=("a",)), Standin("d", "x/d", make("d"), takes=("b", "a")))
    folders = build_standins(tmp_path, vocab_cache="V", standins=table)
    assert folders == {k: tmp_path / "x" / k for k in "abcd"}
    assert seen == [("a", False, "V", ()), ("b", False, "V", ()), ("c", False, "V", ("a-model",)),
                    ("d", False, "V", ("b-model", "a-model"))]
    assert json.loads((tmp_path / "complete.json").read_text())["standins"] == ["a", "b", "c", "d"]
