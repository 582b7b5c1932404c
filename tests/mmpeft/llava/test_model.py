import pytest
import torch

from mmpeft.llava.model import add_image_token, build_llava
from mmpeft.models.trainable import apply_trainability
from mmpeft.presets import load_clip, load_lm, resolve_preset


@pytest.fixture
def parts(small_zoo):
    preset = resolve_preset("tiny", zoo_dir=small_zoo[0])
    lm, tokenizer = load_lm(preset)
    clip, processor = load_clip(preset)
    return lm, tokenizer, clip, processor


def _llava(parts, connector="mlp2x_gelu"):
    lm, tokenizer, clip, _ = parts
    image_id = add_image_token(tokenizer, lm)
    torch.manual_seed(0)
    return build_llava(clip.vision_model, lm, image_id, connector), image_id


def test_llava_reuses_the_loaded_parts_and_reads_the_penultimate_layer(parts):
    lm, tokenizer, clip, _ = parts
    model, image_id = _llava(parts)
    assert model.model.vision_tower is clip.vision_model and model.model.language_model is lm.model
    assert model.lm_head is lm.lm_head
    assert model.config.image_seq_length == 16 and model.config.vision_feature_layer == -2
    assert tokenizer.convert_tokens_to_ids("<image>") == image_id == lm.config.vocab_size - 1
    pixels = torch.randn(1, 3, 64, 64)
    feats = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    hidden = clip.vision_model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(feats, model.model.multi_modal_projector(hidden)[0])
    ids = torch.tensor([[image_id] * 16 + tokenizer("Red.")["input_ids"]])
    assert model(input_ids=ids, pixel_values=pixels).logits.shape == (1, ids.shape[1], lm.config.vocab_size)


def test_linear_connector_is_one_layer(parts):
    model, _ = _llava(parts, "linear")
    assert [type(m).__name__ for m in model.model.multi_modal_projector.children()] == ["Linear"]
    with pytest.raises(ValueError, match="connector must be one of"):
        _llava(parts, "resampler")


def test_lora_on_the_llm_with_the_connector_fully_trained(parts):
    model, _ = _llava(parts)
    parts_map = {"vision": model.model.vision_tower, "connector": model.model.multi_modal_projector,
                 "llm": model.model.language_model}
    peft_model = apply_trainability(model, parts_map, {"vision": "frozen", "connector": "full", "llm": "lora"})
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert all(".language_model." in n for n in lora)
    # 4 layers x 7 linear layers (q, k, v, o, gate, up, down) x (A, B)
    assert len(lora) == 4 * 7 * 2
    assert sorted(set(trainable) - set(lora)) == sorted(
        n for n, _ in peft_model.named_parameters() if "multi_modal_projector.modules_to_save" in n)
    assert not any("vision_tower" in n or "lm_head" in n for n in trainable)


def test_trainability_errors_are_collected(parts):
    model, _ = _llava(parts)
    with pytest.raises(ValueError, match="vision: 'lorra' .*; audio: no such part"):
        apply_trainability(model, {"vision": model.model.vision_tower}, {"vision": "lorra", "audio": "full"})


def test_lora_targets_listed_by_name(parts):
    from mmpeft.models.trainable import LoraSettings

    model, _ = _llava(parts)
    parts_map = {"vision": model.model.vision_tower, "connector": model.model.multi_modal_projector,
                 "llm": model.model.language_model}
    choice = {"vision": "frozen", "connector": "full", "llm": "lora"}
    peft_model = apply_trainability(model, parts_map, choice, LoraSettings(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora) == 4 * 2 * 2 and all(".q_proj." in n or ".v_proj." in n for n in lora)


def test_unknown_lora_target_is_named(parts):
    from mmpeft.models.trainable import LoraSettings

    model, _ = _llava(parts)
    parts_map = {"vision": model.model.vision_tower, "connector": model.model.multi_modal_projector,
                 "llm": model.model.language_model}
    choice = {"vision": "frozen", "connector": "full", "llm": "lora"}
    with pytest.raises(ValueError, match=r"\['qkv'\] match no linear layer .* q_proj"):
        apply_trainability(model, parts_map, choice, LoraSettings(targets=["q_proj", "qkv"]))
