import pytest
import torch

from mmpeft.flamingo.model import FlamingoLM, GatedCrossAttention
from mmpeft.llava.model import add_image_token
from mmpeft.presets import load_clip, load_lm, resolve_preset

SMALL = {"resampler_options": {"latents": 4, "layers": 1, "heads": 2, "head_width": 16},
         "xattn_options": {"every": 2, "heads": 2, "head_width": 16}}


@pytest.fixture
def flamingo(small_zoo):
    preset = resolve_preset("tiny", zoo_dir=small_zoo[0])
    lm, tokenizer = load_lm(preset)
    clip, _ = load_clip(preset)
    image_id = add_image_token(tokenizer, lm)
    torch.manual_seed(0)
    return FlamingoLM(lm, clip.vision_model, image_id, **SMALL), tokenizer, image_id


def _ids(tokenizer, image_id, text="A red square. <image> What colour? <image> Red."):
    pieces = text.split("<image>")
    ids = tokenizer(pieces[0])["input_ids"]
    for piece in pieces[1:]:
        ids += [image_id] + tokenizer(piece, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids])


def test_at_initialisation_the_outputs_are_the_frozen_lms(flamingo):
    model, tokenizer, image_id = flamingo
    ids = _ids(tokenizer, image_id)
    with torch.no_grad():
        fused = model(ids, pixel_values=torch.randn(2, 3, 64, 64)).logits
        plain = model.lm(input_ids=ids).logits
    assert torch.equal(fused, plain)
    assert model.xattn_at == [0, 2] and len(model.xattn) == 2  # before every other decoder layer of 4


def test_each_token_reads_only_its_most_recent_image():
    torch.manual_seed(0)
    block = GatedCrossAttention(8, 2, 4)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)  # the feed-forward gate stays 0, so only cross-attention adds
    x = torch.randn(1, 6, 8)
    index = torch.tensor([[0, 1, 1, 2, 2, 2]])  # token 0 before any image, 1-2 after image 1, 3-5 after image 2
    media = torch.randn(1, 2, 3, 8)
    changed = media.clone()
    changed[0, 0] += 1.0  # a different first image
    with torch.no_grad():
        a, b = block(x, media, index), block(x, changed, index)
    assert torch.equal(a[0, 0], x[0, 0])  # no image yet: nothing added
    assert (a[0, 1:3] - b[0, 1:3]).abs().amax() > 1e-3  # image 1's readers see the change
    assert torch.equal(a[0, 3:], b[0, 3:])  # image 2's readers do not


def test_only_the_resampler_and_the_inserted_layers_train_and_both_get_gradients(flamingo):
    model, tokenizer, image_id = flamingo
    model.requires_grad_(False)
    for part in model.trainable_parts().values():
        part.requires_grad_(True)
    with torch.no_grad():
        for block in model.xattn:
            block.attn_gate.fill_(0.5)
    ids = _ids(tokenizer, image_id)
    loss = model(ids, pixel_values=torch.randn(2, 3, 64, 64), labels=ids).loss
    loss.backward()
    assert model.resampler.latents.grad.abs().sum() > 0 and model.xattn[0].to_kv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.lm.parameters())


def test_generate_reads_the_images_and_a_wrong_image_count_is_an_error(flamingo):
    model, tokenizer, image_id = flamingo
    with torch.no_grad():
        for block in model.xattn:
            block.attn_gate.fill_(1.0)
    ids = _ids(tokenizer, image_id, "A red square. <image> What colour?")
    out = model.generate(ids, pixel_values=torch.randn(1, 3, 64, 64), max_new_tokens=3, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 3) and torch.equal(out[:, :ids.shape[1]], ids)
    with pytest.raises(ValueError, match="1 <image> token.s. but 2 image.s."):
        model(ids, pixel_values=torch.randn(2, 3, 64, 64))
