import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image

from mmpeft.llava.checkpoint import connector_state
from mmpeft.llava.model import add_image_token, build_llava, llava_parts, llava_processor
from mmpeft.models.connectors import PerceiverResampler, QFormerConnector
from mmpeft.models.trainable import apply_trainability
from mmpeft.presets import load_clip, load_lm, resolve_preset

SMALL_QFORMER = {"queries": 8, "layers": 2, "hidden": 32, "heads": 4}
SMALL_RESAMPLER = {"latents": 6, "layers": 2, "heads": 2, "head_width": 8}


@pytest.mark.parametrize("patches", [16, 49])
def test_resampling_connectors_give_a_fixed_number_of_lm_tokens_whatever_the_patches(patches):
    torch.manual_seed(0)
    features = torch.randn(3, patches, 24)
    qformer = QFormerConnector(24, 40, SMALL_QFORMER)
    assert qformer(features).shape == (3, 8, 40) and qformer.tokens == 8
    resampler = PerceiverResampler(24, 40, SMALL_RESAMPLER)
    assert resampler(features).shape == (3, 6, 40) and resampler.tokens == 6
    names = {n.split(".")[0] for n, _ in qformer.named_parameters()}
    assert names == {"query_tokens", "qformer", "projection"}  # BLIP-2's names, plus the map into the LM
    # cross-attention in every other layer, to the vision width
    layers = qformer.qformer.encoder.layer
    assert [hasattr(layer, "crossattention") for layer in layers] == [True, False]
    assert layers[0].crossattention.attention.key.in_features == 24


def test_each_query_reads_the_image():
    torch.manual_seed(0)
    for connector in (QFormerConnector(24, 40, SMALL_QFORMER).eval(), PerceiverResampler(24, 40, SMALL_RESAMPLER)):
        a, b = torch.randn(1, 16, 24), torch.randn(1, 16, 24)
        out_a, out_b = connector(a), connector(b)
        assert (out_a - out_b).abs().amax(-1).min() > 1e-4  # every output token depends on the features


def test_unknown_option_is_named_with_the_options_there_are():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['query'\]; its options: queries, layers"):
        QFormerConnector(24, 40, {"query": 4})


@pytest.fixture
def parts(small_zoo):
    preset = resolve_preset("tiny", zoo_dir=small_zoo[0])
    lm, tokenizer = load_lm(preset)
    clip, processor = load_clip(preset)
    return lm, tokenizer, clip, processor.image_processor


@pytest.mark.parametrize("connector,options,tokens", [("qformer", SMALL_QFORMER, 8),
                                                      ("perceiver_resampler", SMALL_RESAMPLER, 6)])
def test_llava_with_a_resampling_connector_expects_its_token_count(parts, connector, options, tokens):
    lm, tokenizer, clip, image_processor = parts
    image_id = add_image_token(tokenizer, lm)
    torch.manual_seed(0)
    model = build_llava(clip.vision_model, lm, image_id, connector, -2, options)
    assert model.config.image_seq_length == tokens and model.config.mmpeft_connector_options == options
    text = tokenizer("Red.")["input_ids"]
    ids = torch.tensor([[image_id] * tokens + text])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64), labels=ids)
    out.loss.backward()
    assert model.model.multi_modal_projector.projection.weight.grad.abs().sum() > 0
    # the saved processor writes as many placeholders as the connector gives tokens
    processor = llava_processor(image_processor, tokenizer, clip.vision_model.config, image_tokens=tokens)
    inputs = processor(images=Image.new("RGB", (40, 30), "red"), text="<image>Red.", return_tensors="pt")
    assert (inputs["input_ids"] == image_id).sum() == tokens
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="takes no options"):
        build_llava(clip.vision_model, lm, image_id, "mlp2x_gelu", -2, {"queries": 4})


def test_minigpt4_setting_trains_only_the_projection_and_peft_saves_it_under_its_own_names(parts):
    lm, tokenizer, clip, image_processor = parts
    torch.manual_seed(0)
    model = build_llava(clip.vision_model, lm, add_image_token(tokenizer, lm), "qformer", -2, SMALL_QFORMER)
    plain = connector_state(model.model.multi_modal_projector)
    model = apply_trainability(model, llava_parts(model), {"vision": "frozen", "connector": "frozen",
                                                           "projection": "full", "llm": "frozen"})
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["model.multi_modal_projector.projection.bias", "model.multi_modal_projector.projection.weight"]
    # with LoRA beside it, PEFT wraps the projection; the saved connector keeps the plain names
    wrapped = get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["projection"]))
    saved = connector_state(wrapped.base_model.model.model.multi_modal_projector)
    assert sorted(saved) == sorted(plain)
