import shutil

import pytest
import torch

from mmpeft.data.conversation import ConversationEncoder, Sample, read_caption_jsonl
from mmpeft.data.dataset import ConversationDataset, collate_conversations
from mmpeft.data.feature_cache import VisionFeatureCache, feature_key, prepare_feature_cache
from mmpeft.data.templates import chat_template
from mmpeft.llava.model import add_image_token, build_llava, llava_forward, llava_parts
from mmpeft.models.trainable import apply_trainability
from mmpeft.presets import load_clip, load_lm, resolve_preset


def _setup(small_zoo, small_world, tmp_path):
    preset = resolve_preset("tiny", zoo_dir=small_zoo[0])
    lm, tokenizer = load_lm(preset)
    clip, processor = load_clip(preset)
    image_id = add_image_token(tokenizer, lm)
    torch.manual_seed(0)
    model = build_llava(clip.vision_model, lm, image_id)
    encoder = ConversationEncoder(tokenizer, processor.image_processor, chat_template(tokenizer, "plain"), "<image>",
                                  16, 128)
    names = sorted(p.name for p in (small_world / "coco/train").iterdir())
    rows = [f'{{"image": "train/{name}", "caption": "A shape."}}' for name in names]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(rows[:6] + rows[:2]) + "\n")  # the first two images twice
    samples = read_caption_jsonl(jsonl, small_world / "coco")
    return model, clip, processor, encoder, samples, tokenizer


def test_cached_features_give_the_same_loss_and_gradients_as_pixels(small_zoo, small_world, tmp_path):
    model, clip, processor, encoder, samples, tokenizer = _setup(small_zoo, small_world, tmp_path)
    cache = prepare_feature_cache(tmp_path / "cache", samples, encoder, clip.vision_model, -2, log=lambda *_: None)
    assert len(cache.index) == 6  # repeated images share a row
    assert VisionFeatureCache(tmp_path / "cache", cache.folder.name).build(
        samples, encoder, clip.vision_model, -2, log=lambda *_: None) == 0  # a second run encodes nothing
    model = apply_trainability(model, llava_parts(model), {"vision": "frozen", "connector": "full", "llm": "frozen"})
    collate = collate_conversations(tokenizer.pad_token_id)
    by_pixels = collate([ConversationDataset(samples, encoder)[i] for i in range(8)])
    by_cache = collate([ConversationDataset(samples, encoder, features=cache)[i] for i in range(8)])
    assert "pixel_values" not in by_cache and by_cache["image_features"].shape == (8, 16, 128)
    grads = []
    for batch in (by_pixels, by_cache):
        model.zero_grad()
        loss = llava_forward(model, batch).loss
        loss.backward()
        grads.append((loss.detach(), model.model.multi_modal_projector.linear_1.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_the_key_follows_weights_layer_and_preprocessing(small_zoo):
    preset = resolve_preset("tiny", zoo_dir=small_zoo[0])
    clip, processor = load_clip(preset)
    tower, ip = clip.vision_model, processor.image_processor
    key = feature_key(tower, ip, -2, False)
    assert key == feature_key(tower, ip, -2, False)
    assert len({key, feature_key(tower, ip, -1, False), feature_key(tower, ip, -2, True)}) == 3
    with torch.no_grad():
        tower.post_layernorm.weight[0] += 1
    assert feature_key(tower, ip, -2, False) != key


def test_a_missing_image_is_named(small_zoo, small_world, tmp_path):
    model, clip, processor, encoder, samples, _ = _setup(small_zoo, small_world, tmp_path)
    cache = prepare_feature_cache(tmp_path / "cache", samples[:2], encoder, clip.vision_model, -2, log=lambda *_: None)
    shutil.copy(samples[5].images[0], tmp_path / "other.jpg")
    sample = Sample("x", [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A."}],
                    [tmp_path / "other.jpg"])
    with pytest.raises(KeyError, match="not in the feature cache"):
        ConversationDataset([sample], encoder, features=cache)[0]
