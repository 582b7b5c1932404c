import shutil

import pytest
import torch

from mmpeft.data.cache_job import human_bytes
from mmpeft.data.conversation import ConversationEncoder, Sample
from mmpeft.data.dataset import ConversationDataset, collate_conversations
from mmpeft.data.feature_cache import (
    VisionFeatureCache,
    feature_key,
    image_digest,
    prepare_feature_cache,
    tower_features,
)
from mmpeft.data.readers import read_caption_jsonl
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
    pairs = [(None if i % 2 else image_digest(s.images[0]), s.images[0]) for i, s in enumerate(samples)]
    assert VisionFeatureCache(tmp_path / "cache", cache.folder.name).build(  # a prepared dataset's images()
        pairs, encoder, clip.vision_model, -2, log=lambda *_: None) == 0
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
    assert feature_key(tower, ip, -2, False, torch.float32) == key != feature_key(tower, ip, -2, False, torch.bfloat16)
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


def test_a_bf16_build_stores_bf16_features_records_their_size_and_leaves_the_tower_as_it_was(small_zoo, small_world,
                                                                                             tmp_path):
    _, clip, processor, encoder, samples, _ = _setup(small_zoo, small_world, tmp_path)
    tower = clip.vision_model
    before = {name: t.clone() for name, t in tower.state_dict().items()}
    lines = []
    cache = prepare_feature_cache(tmp_path / "cache", samples, encoder, tower, -2, log=lines.append,
                                  dtype=torch.bfloat16)
    assert cache.folder.name == feature_key(tower, processor.image_processor, -2, encoder.pad, torch.bfloat16)
    features = cache.get(image_digest(samples[0].images[0]))
    assert features.dtype == torch.bfloat16 and features.shape == (16, 128)
    torch.testing.assert_close(features.float(), tower_features(tower, encoder.images(samples[0]), -2)[0],
                               rtol=0.05, atol=0.1)
    after = tower.state_dict()  # back in fp32, the very weights: no round trip through bf16
    assert all(after[name].dtype == torch.float32 and torch.equal(after[name], t) for name, t in before.items())
    shards = sorted(cache.folder.glob("shard-*.safetensors"))
    info = {"items": 6, "shards": len(shards), "bytes": sum(p.stat().st_size for p in shards), "dtype": "bfloat16",
            "shape": [16, 128]}
    assert cache.info() == info
    assert lines[-1] == (f"feature cache: 6 images in {cache.folder}: {human_bytes(info['bytes'])} of bfloat16 rows "
                         f"(16, 128) in {len(shards)} shards; 6 encoded now on this rank")
