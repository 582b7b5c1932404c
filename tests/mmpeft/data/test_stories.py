"""VIST stories and caption pairs as voken training samples."""

import json

import pytest
import torch

from mmpeft.data.conversation import ConversationEncoder
from mmpeft.data.diffusion_targets import CaptionTargets, LatentTargets, image_to_sd
from mmpeft.data.stories import (
    StoryStep,
    VokenDataset,
    check_caption_fit,
    check_story_fit,
    read_vist,
    story_context,
    story_samples,
    story_shapes,
)
from mmpeft.data.templates import chat_template
from mmpeft.llava.model import load_base_models
from mmpeft.models.vokens import add_vokens
from mmpeft.presets import load_diffusion, resolve_preset

PROMPTS = {"image": "Draw: {text}", "multimodal": "Next?", "text": "Say it."}


def _vist(small_world, split="train"):
    return (small_world / "vist/sis" / f"{split}.story-in-sequence.json", small_world / "vist/images" / split)


def test_stories_come_in_photo_order_with_their_images(small_world):
    path, images = _vist(small_world)
    stories = read_vist(path, images)
    raw = json.loads(path.read_text())["annotations"]
    assert len(stories) == len(raw) // 5
    first = next(iter(stories.values()))
    assert [s.text for s in first][0].lower() == raw[0][0]["text"]
    assert all(s.image.exists() for steps in stories.values() for s in steps)


def test_a_story_with_a_missing_step_is_named(small_world, tmp_path):
    path, images = _vist(small_world)
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][1:]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: story \S+ has 4 steps, expected 5"):
        read_vist(bad, images)


def test_all_earlier_steps_are_the_context_and_two_tasks_start_at_the_second_step(small_world):
    sid, steps = next(iter(read_vist(*_vist(small_world)).items()))
    samples = story_samples(sid, steps, PROMPTS)  # history None: all earlier steps, as MiniGPT-5
    # MiniGPT-5's VIST data: the image task at all 5 steps, "what happens next" and the text task from k = 1
    assert [s.sample.id for s in samples] == [f"{sid}/0/image"] + [
        f"{sid}/{k}/{task}" for k in range(1, 5) for task in ("image", "multimodal", "text")]
    by_id = {s.sample.id: s for s in samples}
    image, multimodal, text = (by_id[f"{sid}/3/{task}"] for task in ("image", "multimodal", "text"))
    assert image.sample.images == [steps[0].image, steps[1].image, steps[2].image]
    assert image.targets == [steps[3].image] and image.captions == [steps[3].text]
    assert image.sample.messages[0]["content"] == "".join(f"{s.text} <image>\n" for s in steps[:3]) + \
        "Draw: " + steps[3].text
    assert multimodal.sample.images == image.sample.images
    assert multimodal.sample.messages[1]["content"] == steps[3].text + "".join(f"[IMG{i}]" for i in range(8))
    assert text.targets == [] and text.sample.images == [s.image for s in steps[:4]]
    assert text.sample.messages[1]["content"] == steps[3].text
    assert by_id[f"{sid}/0/image"].sample.images == []  # the first step has no history
    last = story_samples(sid, steps, PROMPTS, last_step_only=True)
    assert {s.sample.id for s in last} == {f"{sid}/4/{t}" for t in ("image", "multimodal", "text")}
    assert len(by_id[f"{sid}/4/text"].sample.images) == 5


def test_a_history_count_shows_only_that_many_earlier_steps(small_world):
    sid, steps = next(iter(read_vist(*_vist(small_world)).items()))
    by_id = {s.sample.id: s for s in story_samples(sid, steps, PROMPTS, history=2)}
    assert len(by_id) == 13
    assert by_id[f"{sid}/3/image"].sample.images == [steps[1].image, steps[2].image]
    assert by_id[f"{sid}/1/text"].sample.images == [steps[0].image, steps[1].image]
    assert story_context(steps, 4, 0) == [] and story_context(steps, 4, None) == steps[:4]
    with pytest.raises(ValueError, match="data.history is -1: null"):
        story_samples(sid, steps, PROMPTS, history=-1)
    with pytest.raises(ValueError, match=r"unknown stage-2 task\(s\) \['caption'\]"):
        story_samples(sid, steps, PROMPTS, tasks=["image", "caption"])


@pytest.fixture(scope="module")
def parts(small_zoo):
    preset = resolve_preset("tiny", zoo_dir=small_zoo[0])
    lm, tokenizer, _, image_processor = load_base_models(preset)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    voken_ids = add_vokens(tokenizer, lm)
    return tokenizer, image_processor, voken_ids, load_diffusion(preset)


def _encoder(parts, max_length):
    tokenizer, image_processor, _, _ = parts
    return ConversationEncoder(tokenizer, image_processor, chat_template(tokenizer, "tokenizer"), "<image>", 4,
                               max_length)


def test_vokens_cut_by_truncation_are_named_or_counted(small_world, parts):
    sid, steps = next(iter(read_vist(*_vist(small_world)).items()))
    samples = story_samples(sid, steps, PROMPTS, tasks=["multimodal"], history=0)
    lengths = [len(_encoder(parts, 512).encode_text(s.sample)["input_ids"]) for s in samples]
    cut = min(lengths) - 3  # inside the voken run of every sample
    latents = LatentTargets(parts[3].vae, 32)
    with pytest.raises(ValueError, match=f"record {sid}/1/multimodal: .*voken run"):
        VokenDataset(samples, _encoder(parts, cut), parts[2], latents)
    data = VokenDataset(samples[:1] + story_samples(sid, steps, PROMPTS, tasks=["text"], history=0),
                        _encoder(parts, cut), parts[2], latents, skip_bad_records=True)
    assert data.skipped == {"vokens cut or unmatched": 1} and len(data) == 4  # text samples from step 1 on


def test_targets_from_the_cache_equal_fresh_encodings(small_world, parts, tmp_path):
    _, _, _, pipe = parts
    images = sorted((small_world / "vist/images/train").glob("*.jpg"))[:5]
    fresh = LatentTargets(pipe.vae, 32)(images)
    cached = LatentTargets(pipe.vae, 32, tmp_path)
    assert cached.prepare(images, log=lambda *_: None) == 5 and cached.prepare(images, log=lambda *_: None) == 0
    assert torch.allclose(cached(images), fresh, atol=1e-6) and fresh.shape == (5, 4, 8, 8)
    texts = ["a red circle.", "a blue square."]
    captions = CaptionTargets(pipe.tokenizer, pipe.text_encoder, tmp_path)
    captions.prepare(texts, log=lambda *_: None)
    assert torch.allclose(captions(texts), CaptionTargets(pipe.tokenizer, pipe.text_encoder)(texts), atol=1e-6)
    assert captions(texts).shape == (2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)


def test_images_are_centre_cropped_to_the_sd_size():
    from PIL import Image

    im = Image.new("RGB", (80, 40), (255, 0, 0))
    x = image_to_sd(im, 32)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[0], torch.ones(32, 32)) and torch.allclose(x[1], -torch.ones(32, 32))


def test_the_fit_check_stops_a_max_length_that_cannot_hold_the_largest_sample(parts):
    _, _, voken_ids, _ = parts
    shapes = {s.task: s for s in story_shapes(_encoder(parts, 512), voken_ids, PROMPTS, ["image", "multimodal", "text"],
                                              history=2)}
    assert (shapes["text"].images, shapes["image"].images, shapes["multimodal"].images) == (3, 2, 2)
    assert (shapes["text"].vokens, shapes["image"].vokens) == (0, 8)
    # the count is the encoder's own: a real image-task sample whose sentences are empty
    steps = [StoryStep("", f"{k}.jpg") for k in range(3)]
    real = story_samples("s", steps, PROMPTS, tasks=["image"], history=2, last_step_only=True)[0]
    assert real.sample.id == "s/2/image"
    assert len(_encoder(parts, 512).encode_text(real.sample)["input_ids"]) == shapes["image"].tokens
    largest = max(shapes.values(), key=lambda s: s.tokens)
    at_history_1 = max(story_shapes(_encoder(parts, 512), voken_ids, PROMPTS, list(shapes), history=1),
                       key=lambda s: s.tokens)
    limit = largest.tokens - 1
    assert at_history_1.tokens <= limit  # 4 image tokens an image: one image fewer fits
    with pytest.raises(ValueError) as err:
        check_story_fit(_encoder(parts, limit), voken_ids, PROMPTS, list(shapes), history=2)
    message = str(err.value)
    assert message.startswith(f"data.max_length {limit} cannot hold a stage-2 sample with data.history 2: "
                              f"{largest.task} task with {largest.images} image(s): {largest.images} x 4 image tokens")
    assert f"= {largest.tokens}; " in message
    assert f"raise data.max_length to at least {largest.tokens} (the sentences come on top) or lower " \
           f"data.history to 1 (largest sample then: {at_history_1.describe()})" in message
    fits = check_story_fit(_encoder(parts, largest.tokens), voken_ids, PROMPTS, list(shapes), history=2)
    assert max(s.tokens for s in fits) == largest.tokens


def test_the_fit_check_with_all_earlier_steps_counts_five_images_and_offers_a_cap(parts):
    _, _, voken_ids, _ = parts
    tasks = ["image", "multimodal", "text"]
    shapes = {s.task: s for s in story_shapes(_encoder(parts, 512), voken_ids, PROMPTS, tasks, history=None)}
    assert (shapes["text"].images, shapes["image"].images, shapes["multimodal"].images) == (5, 4, 4)
    assert shapes == {s.task: s for s in story_shapes(_encoder(parts, 512), voken_ids, PROMPTS, tasks, history=4)}
    largest = max(shapes.values(), key=lambda s: s.tokens)  # at 4 tokens an image: 4 images + 8 vokens
    at_history_3 = max(story_shapes(_encoder(parts, 512), voken_ids, PROMPTS, tasks, history=3),
                       key=lambda s: s.tokens)
    with pytest.raises(ValueError) as err:
        check_story_fit(_encoder(parts, largest.tokens - 1), voken_ids, PROMPTS, tasks, history=None)
    message = str(err.value)
    assert message.startswith(f"data.max_length {largest.tokens - 1} cannot hold a stage-2 sample with data.history "
                              f"null (all earlier steps): {largest.task} task with {largest.images} image(s): "
                              f"{largest.images} x 4 image tokens")
    assert message.endswith(f"or lower data.history to 3 (largest sample then: {at_history_3.describe()})")


def test_the_caption_fit_check_counts_the_prompt_and_the_vokens(parts):
    _, _, voken_ids, _ = parts
    shape = check_caption_fit(_encoder(parts, 512), voken_ids, "Draw: {caption}")
    assert (shape.images, shape.vokens) == (0, 8)
    with pytest.raises(ValueError, match=f"data.max_length {shape.tokens - 1} cannot hold a stage-1 sample: caption "
                                         f"task with 0 image\\(s\\): .* = {shape.tokens}; raise data.max_length to "
                                         f"at least {shape.tokens}"):
        check_caption_fit(_encoder(parts, shape.tokens - 1), voken_ids, "Draw: {caption}")


def test_the_skip_report_counts_records_by_reason(small_world, parts):
    sid, steps = next(iter(read_vist(*_vist(small_world)).items()))
    samples = story_samples(sid, steps, PROMPTS, history=0)
    longest = max(len(_encoder(parts, 512).encode_text(s.sample)["input_ids"]) for s in samples)
    data = VokenDataset(samples, _encoder(parts, longest - 3), parts[2], LatentTargets(parts[3].vae, 32),
                        skip_bad_records=True)
    skipped = sum(data.skipped.values())
    assert skipped >= 1 and len(data) + skipped == len(samples)
    report = data.skip_report()
    assert report.startswith(f"skipped {skipped} record(s): ")
    assert all(f"{n} {reason}" in report for reason, n in data.skipped.items())
