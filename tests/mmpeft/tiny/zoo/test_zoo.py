import json
import shutil
import time

import pytest
import torch
from PIL import Image

from mmpeft.presets import load_clip, load_diffusion, load_lm, resolve_preset
from mmpeft.tiny.zoo import build_zoo


def test_zoo_writes_every_part_with_its_record(small_zoo):
    root, records = small_zoo
    assert set(records) == {"clip", "lm", "vae", "sd"}
    for name, record in records.items():
        on_disk = json.loads((root / name / "zoo_part.json").read_text())
        assert on_disk == record and record["spec"]["clip_steps"] == 2
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert {f for f in files if f.startswith("clip/")} == {
        f"clip/{n}" for n in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                              "tokenizer_config.json", "zoo_part.json")}
    assert {f for f in files if f.startswith("lm/")} == {
        f"lm/{n}" for n in ("chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                            "tokenizer.json", "tokenizer_config.json", "zoo_part.json")}
    assert {f for f in files if f.startswith("sd/")} == {
        "sd/model_index.json", "sd/zoo_part.json", "sd/scheduler/scheduler_config.json",
        "sd/text_encoder/config.json", "sd/text_encoder/model.safetensors", "sd/tokenizer/tokenizer.json",
        "sd/tokenizer/tokenizer_config.json", "sd/unet/config.json", "sd/unet/diffusion_pytorch_model.safetensors",
        "sd/vae/config.json", "sd/vae/diffusion_pytorch_model.safetensors"}


def test_second_build_reuses_every_part(small_zoo, small_world):
    from mmpeft.tiny.zoo.build import ZooSpec  # same spec as the fixture's

    root, records = small_zoo
    spec = ZooSpec(**records["clip"]["spec"])
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    start = time.time()
    again = build_zoo(root, small_world, spec)
    assert time.time() - start < 5
    assert again == records
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")} == stamps


def _copy_of(root, tmp_path):
    copy = tmp_path / "zoo"
    shutil.copytree(root, copy)
    return copy


def _rewritten(folder, build) -> list[str]:
    """The top-level folders of `folder` in which `build()` rewrote a file."""
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    build()
    return sorted({p.relative_to(folder).parts[0] for p in before if p.stat().st_mtime_ns != before[p]})


def _written_before(part, *fields) -> None:
    """Make `part`'s record look as written before `fields` existed in `ZooSpec`."""
    marker = part / "zoo_part.json"
    record = json.loads(marker.read_text())
    for field in fields:
        del record["spec"][field]
    marker.write_text(json.dumps(record))


def test_a_changed_setting_retrains_only_the_parts_that_depend_on_it(small_zoo, small_world, tmp_path):
    from dataclasses import replace

    from mmpeft.tiny.zoo.build import ZooSpec

    root, records = small_zoo
    copy = _copy_of(root, tmp_path)
    spec = ZooSpec(**records["clip"]["spec"])
    more_questions = replace(spec, lm_chat_questions=spec.lm_chat_questions + 1)
    assert _rewritten(copy, lambda: build_zoo(copy, small_world, more_questions, workers=1)) == ["lm"]
    longer_vae = replace(spec, vae_steps=spec.vae_steps + 1)
    # lm: back to the fixture's setting
    assert _rewritten(copy, lambda: build_zoo(copy, small_world, longer_vae, workers=1)) == ["lm", "sd", "vae"]


def test_a_zoo_built_on_another_world_is_retrained_whole(small_zoo, small_world, small_world_spec, tmp_path):
    from dataclasses import replace

    from mmpeft.tiny.world import build_world
    from mmpeft.tiny.zoo.build import ZooSpec

    root, records = small_zoo
    copy = _copy_of(root, tmp_path)
    other = build_world(tmp_path / "other", replace(small_world_spec, seed=small_world_spec.seed + 1))
    spec = ZooSpec(**records["clip"]["spec"])
    assert _rewritten(copy, lambda: build_zoo(copy, other, spec)) == ["clip", "lm", "sd", "tokenizers", "vae"]
    record = json.loads((copy / "sd" / "zoo_part.json").read_text())
    assert record["world"] == json.loads((other / "world.json").read_text())
    assert json.loads((copy / "tokenizers" / "done").read_text())["seed"] == small_world_spec.seed + 1


def test_a_zoo_that_did_not_note_its_world_counts_as_built_on_version_1(small_zoo, small_world, tmp_path):
    from mmpeft.tiny.zoo.build import ZooSpec

    root, records = small_zoo
    copy = _copy_of(root, tmp_path)
    for marker in copy.glob("*/zoo_part.json"):  # as written before parts noted their world
        record = json.loads(marker.read_text())
        del record["world"]
        marker.write_text(json.dumps(record))
    (copy / "tokenizers" / "done").write_text("")
    assert json.loads((small_world / "world.json").read_text())["version"] == 1
    assert _rewritten(copy, lambda: build_zoo(copy, small_world, ZooSpec(**records["clip"]["spec"]))) == []


def test_parts_share_the_cores_only_when_they_train_side_by_side():
    from mmpeft.tiny.zoo.build import part_threads

    assert part_threads(["clip", "lm", "vae", "sd"], workers=2, cores=2) == 1
    assert part_threads(["lm", "sd"], workers=2, cores=2) == 1  # lm and sd start together when clip and vae are built
    assert part_threads(["vae", "sd"], workers=2, cores=2) == 2  # sd waits for vae
    assert part_threads(["clip", "sd"], workers=2, cores=2) == 2  # sd waits for clip
    assert part_threads(["lm"], workers=2, cores=2) == 2
    assert part_threads(["clip", "vae"], workers=1, cores=2) == 2


def test_tiny_preset_loads_each_part_by_path(small_zoo):
    root, _ = small_zoo
    preset = resolve_preset("tiny", zoo_dir=root)
    assert preset.lm == str(root / "lm")

    lm, tokenizer = load_lm(preset)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is the circle?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3 or tokenizer.eos_token_id in out[0].tolist()

    clip, processor = load_clip(preset)
    batch = processor(text=["a red circle"], images=[Image.new("RGB", (64, 64))], return_tensors="pt",
                      padding=True)
    out = clip(**batch)
    assert out.logits_per_image.shape == (1, 1)
    assert batch["pixel_values"].shape == (1, 3, 64, 64)

    pipe = load_diffusion(preset)
    image = pipe("a red circle", height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim


def test_sd_text_encoder_is_the_clip_text_tower(small_zoo):
    root, _ = small_zoo
    preset = resolve_preset("tiny", zoo_dir=root)
    clip, _ = load_clip(preset)
    pipe = load_diffusion(preset)
    for name, value in pipe.text_encoder.state_dict().items():
        assert torch.equal(value, clip.text_model.state_dict()[name]), name


def test_sd_pads_prompts_to_its_text_length_and_refuses_one_that_cuts_a_caption(small_zoo, small_world, tmp_path):
    from dataclasses import replace

    from mmpeft.tiny.zoo.build import ZooSpec, build_sd

    root, records = small_zoo
    spec = ZooSpec(**records["sd"]["spec"])
    pipe = load_diffusion(resolve_preset("tiny", zoo_dir=root))
    assert pipe.tokenizer.model_max_length == spec.sd_text_length == 32
    assert load_clip(resolve_preset("tiny", zoo_dir=root))[1].tokenizer.model_max_length == 77
    copy = _copy_of(root, tmp_path)
    with pytest.raises(ValueError, match=r"sd_text_length=8 would cut the caption '.+' \(\d+ tokens\)"):
        build_sd(copy, small_world, replace(spec, sd_text_length=8))


def test_lm_chat_template_marks_assistant_tokens(small_zoo):
    root, _ = small_zoo
    _, tokenizer = load_lm(resolve_preset("tiny", zoo_dir=root))
    messages = [{"role": "user", "content": "How many objects are in the image?"},
                {"role": "assistant", "content": "Two."}]
    enc = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(marked) == "Two.<|im_end|>"


def test_lm_corpus_learns_whole_text_and_only_the_answers_of_chats(small_zoo):
    from mmpeft.tiny.zoo.lm import batch_tensors, encode_corpus

    root, _ = small_zoo
    _, tokenizer = load_lm(resolve_preset("tiny", zoo_dir=root))
    chat = {"messages": [{"role": "user", "content": "A red circle at the top left. Where is the circle?"},
                         {"role": "assistant", "content": "Top left."},
                         {"role": "user", "content": "How many objects are in the image?"},
                         {"role": "assistant", "content": "One."}]}
    text = {"text": "A red circle."}
    (chat_ids, chat_learned), (text_ids, text_learned) = encode_corpus(tokenizer, [chat, text])
    assert tokenizer.decode([i for i, m in zip(chat_ids, chat_learned, strict=True) if m]) == \
        "Top left.<|im_end|>One.<|im_end|>"
    assert text_learned == [1] * len(text_ids) and tokenizer.decode(text_ids) == "A red circle.<|im_end|>"
    (_, every), _ = encode_corpus(tokenizer, [chat, text], chat_loss="all")
    assert every == [1] * len(chat_ids)

    batch = batch_tensors(encode_corpus(tokenizer, [chat, text]), tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(chat_ids))
    assert batch["attention_mask"][1].tolist() == [1] * len(text_ids) + [0] * (len(chat_ids) - len(text_ids))
    learned = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert tokenizer.decode(learned) == "Top left.<|im_end|>One.<|im_end|>"
    assert batch["labels"][1, :len(text_ids)].tolist() == text_ids
    assert (batch["labels"][1, len(text_ids):] == -100).all()


def test_an_lm_built_before_answer_only_chats_is_retrained(small_zoo, small_world, tmp_path):
    from mmpeft.tiny.zoo.build import ZooSpec

    root, records = small_zoo
    copy = _copy_of(root, tmp_path)
    _written_before(copy / "lm", "lm_chat_loss")  # when chats were learned whole
    # two workers, one part: all threads
    assert _rewritten(copy, lambda: build_zoo(copy, small_world, ZooSpec(**records["clip"]["spec"]))) == ["lm"]


def test_sd_learns_one_object_scenes_with_the_caption_that_names_the_cell(small_world):
    from dataclasses import replace

    from mmpeft.tiny.zoo.build import ZooSpec, sd_training_set

    spec = replace(ZooSpec(), sd_single_objects=6)
    images, caption_sets = sd_training_set(small_world, spec)
    assert len(images) == len(caption_sets) == 6 and images[0].size == (32, 32)
    assert all(len(caps) == 1 and caps[0].count(" at the ") == 1 for caps in caption_sets)
    world_too, all_captions = sd_training_set(small_world, replace(spec, sd_world_images=True, sd_captions="all"))
    assert len(world_too) == len(all_captions) == 40 + 6  # the small world's 40 training images first
    assert all(len(caps) == 5 for caps in all_captions)
    assert [caps[0] for caps in all_captions[40:]] == [caps[0] for caps in caption_sets]
    with pytest.raises(ValueError, match="sd_captions"):
        sd_training_set(small_world, replace(spec, sd_captions="some"))


def test_an_sd_built_on_the_world_images_and_every_caption_is_retrained(small_zoo, small_world, tmp_path):
    from mmpeft.tiny.zoo.build import ZooSpec

    root, records = small_zoo
    copy = _copy_of(root, tmp_path)
    _written_before(copy / "sd", "sd_world_images", "sd_captions")
    assert _rewritten(copy, lambda: build_zoo(copy, small_world, ZooSpec(**records["clip"]["spec"]))) == ["sd"]


def test_clip_tokenizer_is_the_same_in_every_build(small_world):
    from mmpeft.data.coco import read_coco
    from mmpeft.tiny.zoo.tokenizers import train_clip_tokenizer

    captions = [c for im in read_coco(small_world / "coco/train", small_world / "coco/annotations/captions_train.json")
                for c in im.captions]
    # the trainer's hash-map order changes with each run, within one process too
    builds = [train_clip_tokenizer(captions) for _ in range(5)]
    first = builds[0].get_vocab()
    assert all(t.get_vocab() == first for t in builds[1:])
    assert all(t(captions).input_ids == builds[0](captions).input_ids for t in builds[1:])
    assert [first[s] for s in ("<|startoftext|>", "<|endoftext|>")] == [0, 1]
    others = sorted(t for t in first if not t.startswith("<|"))
    assert [first[t] for t in others] == list(range(2, len(first)))
