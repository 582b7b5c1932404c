"""Starting from released LLaVA artifacts: a native checkpoint (`init_from`) and LLaVA's
stage-1 `mm_projector.bin` (`init_connector`)."""

import pytest
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from mmpeft.llava.export import native_llava
from mmpeft.llava.model import add_image_token, build_llava, llava_processor
from mmpeft.llava.released import load_connector, load_released_llava
from mmpeft.presets import load_clip, load_lm, resolve_preset


def _llava(zoo, connector="mlp2x_gelu", seed=0):
    preset = resolve_preset("tiny", zoo_dir=zoo)
    lm, tokenizer = load_lm(preset)
    clip, clip_processor = load_clip(preset)
    image_id = add_image_token(tokenizer, lm)
    torch.manual_seed(seed)
    model = build_llava(clip.vision_model, lm, image_id, connector)
    return model, llava_processor(clip_processor.image_processor, tokenizer, clip.vision_model.config)


def _mm_projector_bin(state: dict, path, names: dict) -> dict:
    """`state` (mmpeft's connector names) saved under LLaVA's names, in LLaVA's fp16."""
    released = {names[k]: v.half() for k, v in state.items()}
    torch.save(released, path)
    return released


@pytest.fixture(scope="module")
def released(small_zoo, tmp_path_factory):
    """A tiny LLaVA saved as transformers' native LLaVA is published (weights, config, processor)."""
    model, processor = _llava(small_zoo[0])
    folder = tmp_path_factory.mktemp("released") / "llava-tiny-hf"
    native_llava(model).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_mm_projector_bin_loads_into_the_mlp2x_gelu_connector(small_zoo, tmp_path):
    source, _ = _llava(small_zoo[0], seed=1)
    names = {"linear_1.weight": "model.mm_projector.0.weight", "linear_1.bias": "model.mm_projector.0.bias",
             "linear_2.weight": "model.mm_projector.2.weight", "linear_2.bias": "model.mm_projector.2.bias"}
    released = _mm_projector_bin(source.model.multi_modal_projector.state_dict(), tmp_path / "mm_projector.bin",
                                 names)
    target, _ = _llava(small_zoo[0], seed=2)
    projector = target.model.multi_modal_projector
    assert not torch.equal(projector.linear_1.weight, released["model.mm_projector.0.weight"].float())
    assert load_connector(projector, tmp_path, "mlp2x_gelu") == tmp_path / "mm_projector.bin"  # the folder
    for ours, theirs in names.items():
        torch.testing.assert_close(projector.state_dict()[ours], released[theirs].float(), rtol=0, atol=0)
    assert projector.linear_1.weight.dtype == torch.float32  # cast into the connector's dtype
    nn.init.zeros_(projector.linear_2.weight)
    load_connector(projector, tmp_path / "mm_projector.bin", "mlp2x_gelu")  # the file itself
    torch.testing.assert_close(projector.linear_2.weight, released["model.mm_projector.2.weight"].float())


def test_llava_1s_linear_projector_has_no_layer_index(small_zoo, tmp_path):
    source, _ = _llava(small_zoo[0], "linear", seed=1)
    names = {"linear_1.weight": "model.mm_projector.weight", "linear_1.bias": "model.mm_projector.bias"}
    released = _mm_projector_bin(source.model.multi_modal_projector.state_dict(), tmp_path / "mm_projector.bin",
                                 names)
    target, _ = _llava(small_zoo[0], "linear", seed=2)
    load_connector(target.model.multi_modal_projector, tmp_path, "linear")
    torch.testing.assert_close(target.model.multi_modal_projector.linear_1.bias,
                               released["model.mm_projector.bias"].float(), rtol=0, atol=0)


def test_a_wrong_mm_projector_is_reported_by_file_key_and_both_shapes(small_zoo, tmp_path):
    model, _ = _llava(small_zoo[0])
    state = model.model.multi_modal_projector.state_dict()
    bad = {"model.mm_projector.0.weight": torch.zeros(64, 32), "model.mm_projector.0.bias": state["linear_1.bias"],
           "model.mm_projector.2.weight": state["linear_2.weight"], "model.mm_projector.4.weight": torch.zeros(3)}
    torch.save(bad, tmp_path / "mm_projector.bin")
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ValueError) as err:
        load_connector(model.model.multi_modal_projector, tmp_path, "mlp2x_gelu")
    message = str(err.value)
    assert str(tmp_path / "mm_projector.bin") in message
    assert "model.mm_projector.0.weight has shape (64, 32) but the mlp2x_gelu connector's linear_1.weight has " \
           "(128, 128)" in message
    assert "model.mm_projector.4.weight is no parameter" in message and "no tensor for the connector's linear_2.bias" \
        in message  # every problem at once
    for k, v in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, before[k])  # nothing half-loaded


def test_init_connector_names_both_accepted_files_when_a_folder_has_neither(small_zoo, tmp_path):
    model, _ = _llava(small_zoo[0])
    with pytest.raises(FileNotFoundError, match="connector.safetensors .* or mm_projector.bin"):
        load_connector(model.model.multi_modal_projector, tmp_path, "mlp2x_gelu")


def test_released_llava_loads_every_part_from_the_checkpoint(released):
    model, processor = load_released_llava(str(released))
    reference = LlavaForConditionalGeneration.from_pretrained(released).eval()
    assert processor.image_token == "<image>"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert model.config.vision_feature_layer == -2
    torch.manual_seed(0)
    ids = torch.cat([torch.full((1, 16), model.config.image_token_id), torch.tensor([[5, 6, 7]])], dim=1)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits,
                                   reference(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=0)


def test_qlora_from_a_released_llava_quantizes_the_lm_alone(released):
    model, _ = load_released_llava(str(released), qlora=True)
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) == 4 * 7  # every linear layer of the LM's 4 layers
    assert all(n.startswith("model.language_model.") for n in quantized)
    for kept in (model.model.vision_tower, model.model.multi_modal_projector, model.lm_head):
        linears = [m for m in kept.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is nn.Linear for m in linears)


def test_a_checkpoint_whose_image_token_disagrees_with_its_config_is_refused(released, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(released, copy)
    config = LlavaForConditionalGeneration.config_class.from_pretrained(copy)
    config.image_token_id = 3
    config.save_pretrained(copy)
    with pytest.raises(ValueError, match=f"LLaVA checkpoint {copy}: .*image token '<image>' has id .* but "
                                         "config.json's image_token_id is 3"):
        load_released_llava(str(copy))
