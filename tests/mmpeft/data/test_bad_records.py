"""Every training reader's bad records, under both settings of `skip_bad_records`: off, the
dataset stops naming the file, the record and the reason; on, the record is left out and
counted by reason. And caption shards read in place: samples hold references, not bytes."""

import gzip
import io
import json
import pickle
import re
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from mmpeft.data.coco import read_coco
from mmpeft.data.conversation import BadRecord, ConversationEncoder, Sample, ShardMember, image_bytes, open_image
from mmpeft.data.dataset import ConversationDataset
from mmpeft.data.feature_cache import image_digest
from mmpeft.data.readers import read_caption_jsonl, read_caption_shards, read_messages_dataset
from mmpeft.data.stories import VokenDataset, read_vist, story_samples
from mmpeft.data.templates import chat_template
from mmpeft.llava.model import IMAGE_TOKEN
from mmpeft.tiny.zoo.tokenizers import train_lm_tokenizer

VOKENS = [f"[IMG{i}]" for i in range(8)]
PROMPTS = {"image": "Draw: {text}", "multimodal": "Next?", "text": "Say it."}


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["A red circle.", "A blue square on the left.", "What colour is it?", "Red.", "Draw: Next? Say it."] * 20
    tok = train_lm_tokenizer(texts, vocab_size=300)
    tok.add_tokens([IMAGE_TOKEN, *VOKENS], special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def encoder(tokenizer):
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return ConversationEncoder(tokenizer, processor, chat_template(tokenizer, "tokenizer"), IMAGE_TOKEN, 4, 512)


def _png(side: int, seed: int = 0) -> bytes:
    """Noise, so PNG cannot compress it: the encoded size grows with the side."""
    pixels = torch.randint(0, 256, (side, side, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed)).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _pairs(side: int, n: int = 3) -> list[tuple[str, bytes]]:
    return [m for k in range(n) for m in ((f"k{k}.png", _png(side, k)), (f"k{k}.txt", b"A red circle."))]


# ----- caption shards read in place


def test_shard_samples_hold_small_references_whatever_the_image_size(tmp_path):
    sizes = {}
    for folder, side in (("a", 8), ("b", 256)):
        (tmp_path / folder).mkdir()
        _tar(tmp_path / folder / "s0.tar", _pairs(side))
        samples = read_caption_shards(str(tmp_path / folder / "*.tar"))
        assert all(isinstance(s.images[0], ShardMember) for s in samples)
        sizes[side] = len(pickle.dumps(samples))
    image_total = sum(len(_png(256, k)) for k in range(3))
    assert image_total > 500_000  # the large images: ~200 KB each
    assert abs(sizes[256] - sizes[8]) < 60  # only the offsets' and sizes' integers differ
    assert sizes[256] < 2_000


def test_a_shard_image_reads_back_as_the_original(tmp_path, encoder):
    _tar(tmp_path / "s0.tar", _pairs(24))
    samples = read_caption_shards(str(tmp_path / "s*.tar"))
    assert [s.id for s in samples] == ["s0.tar/k0", "s0.tar/k1", "s0.tar/k2"]
    member = samples[1].images[0]
    assert image_bytes(member) == _png(24, 1) and image_digest(member) == image_digest(_png(24, 1))
    assert str(member) == f"{tmp_path}/s0.tar/k1.png"
    original = Image.open(io.BytesIO(_png(24, 1))).convert("RGB")
    assert open_image(member, "x").tobytes() == original.tobytes()
    (tmp_path / "k1.png").write_bytes(_png(24, 1))
    assert torch.equal(encoder.images(samples[1]), encoder.images(Sample("f", [], [tmp_path / "k1.png"])))


def test_a_shard_dataset_pickles_for_dataloader_workers(tmp_path, encoder):
    _tar(tmp_path / "s0.tar", _pairs(24))
    dataset = ConversationDataset(read_caption_shards(str(tmp_path / "s*.tar")), encoder)
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    for k in range(len(dataset)):
        assert copy[k]["id"] == dataset[k]["id"] and copy[k]["input_ids"] == dataset[k]["input_ids"]
        assert torch.equal(copy[k]["pixel_values"], dataset[k]["pixel_values"])
    assert not torch.equal(copy[0]["pixel_values"], copy[1]["pixel_values"])  # each its own image


def _cut_inside_an_image(raw: bytes) -> bytes:
    return raw[:512 + 100]  # the first header and 100 bytes of its image


def _cut_between_members(raw: bytes) -> bytes:
    info = tarfile.open(fileobj=io.BytesIO(raw)).getmembers()[2]
    return raw[:info.offset]  # two whole members, then nothing: tarfile alone would not notice


@pytest.mark.parametrize("damage,reason", [
    (_cut_inside_an_image, "member k0.png runs past the end of the file"),
    (_cut_between_members, "no end-of-archive block at byte .* after 2 member"),
    (gzip.compress, "gzip-compressed; images are read in place"),
    (lambda raw: b"not a tar at all" * 64, "unreadable shard"),
])
def test_a_damaged_shard_is_a_bad_record_named_by_its_file(tmp_path, damage, reason):
    raw = _tar(tmp_path / "s1.tar", _pairs(24)).read_bytes()
    (tmp_path / "s1.tar").write_bytes(damage(raw))
    (bad,) = read_caption_shards(str(tmp_path / "s*.tar"))
    assert bad.id == "s1.tar" and bad.problem[1] == "unreadable shard"
    assert bad.problem[0].startswith(f"unreadable shard {tmp_path / 's1.tar'}: ") and re.search(reason, bad.problem[0])


def test_a_damaged_shard_stops_the_dataset_or_is_skipped_and_counted(tmp_path, encoder):
    _tar(tmp_path / "s0.tar", _pairs(24, n=2))
    (tmp_path / "s1.tar").write_bytes(_cut_inside_an_image(_tar(tmp_path / "s1.tar", _pairs(24)).read_bytes()))
    samples = read_caption_shards(str(tmp_path / "s*.tar"))
    with pytest.raises(BadRecord, match=r"^shards: record s1.tar: unreadable shard .*s1.tar: member k0.png runs "
                                        "past the end"):
        ConversationDataset(samples, encoder, source="shards")
    kept = ConversationDataset(samples, encoder, skip_bad_records=True)
    assert [s.id for s, _ in kept.items] == ["s0.tar/k0", "s0.tar/k1"]
    assert dict(kept.skipped) == {"unreadable shard": 1}
    assert kept.skip_report().startswith("skipped 1 record(s): 1 unreadable shard (ids: s1.tar)")


def test_a_shard_cut_after_it_was_read_names_the_image(tmp_path, encoder):
    path = _tar(tmp_path / "s0.tar", _pairs(24, n=2))
    samples = read_caption_shards(str(path))
    member = samples[1].images[0]
    path.write_bytes(path.read_bytes()[:member.offset + 10])
    with pytest.raises(BadRecord, match=f"record s0.tar/k1: cannot read image {re.escape(str(member))}: .*ends 10 "
                                        f"of {member.size} bytes into the member"):
        ConversationDataset(samples, encoder)
    kept = ConversationDataset(samples, encoder, skip_bad_records=True)
    assert len(kept) == 1 and dict(kept.skipped) == {"bad image": 1} and kept.skipped_ids == ["s0.tar/k1"]


def test_shard_keys_follow_webdataset_and_a_caption_must_be_text(tmp_path):
    _tar(tmp_path / "s0.tar", [("v1.0/k.png", _png(8)), ("v1.0/k.txt", b"Red."), ("k1.JPG", _png(8)),
                               ("k1.txt", b"\xff\xfe"), ("k2.json", b"{}")])
    samples = read_caption_shards(str(tmp_path / "s0.tar"))
    assert [(s.id, s.problem) for s in samples] == [
        ("s0.tar/v1.0/k", None),  # the key ends at the first dot of the file's own name
        ("s0.tar/k1", ("the caption (.txt) is not UTF-8 text", "malformed")),
        ("s0.tar/k2", ("no image", "no image"))]
    assert samples[0].images[0].name == "v1.0/k.png" and samples[0].messages[1]["content"] == "Red."


# ----- the other readers, each with a bad record under both settings


def test_messages_dataset_bad_rows_stop_or_are_counted(tmp_path, encoder):
    good = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                         {"role": "assistant", "content": "Red."}], "images": [_png(8)]}
    rows = [good, {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "Red."}]},
            {"messages": "hi"}, {"messages": [{"role": "user", "content": [3]}]}]
    samples = read_messages_dataset(rows)
    with pytest.raises(BadRecord, match=r"^train.parquet: record #1: unknown role\(s\) \['robot'\]$"):
        ConversationDataset(samples, encoder, source="train.parquet")
    kept = ConversationDataset(samples, encoder, skip_bad_records=True)
    assert [s.id for s, _ in kept.items] == ["#0"]
    assert dict(kept.skipped) == {"unknown speaker": 1, "malformed": 2} and kept.skipped_ids == ["#1", "#2", "#3"]


def test_caption_jsonl_bad_lines_stop_or_are_counted(tmp_path, encoder):
    (tmp_path / "a.png").write_bytes(_png(8))
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join([json.dumps({"image": "a.png", "caption": "A red circle."}), '{"image": "a.png", "cap',
                               json.dumps({"image": "a.png"}), "[1, 2]", json.dumps({"image": "gone.png",
                                                                                      "caption": "Lost."})]) + "\n")
    samples = read_caption_jsonl(path, tmp_path)
    assert samples[1].problem[1] == "not JSON" and f"line 2 of {path} is not JSON" in samples[1].problem[0]
    with pytest.raises(BadRecord, match=f"^{re.escape(f'{path}: record line2: line 2 of {path} is not JSON')}"):
        ConversationDataset(samples, encoder, source=str(path))
    kept = ConversationDataset(samples, encoder, skip_bad_records=True)
    assert [s.id for s, _ in kept.items] == ["line1"]
    assert dict(kept.skipped) == {"not JSON": 1, "malformed": 2, "bad image": 1}
    assert kept.skipped_ids == ["line2", "line3", "line4", "line5"]


def _vist(tmp_path, missing: str, empty: str) -> tuple:
    """Two five-step stories, A and B; the photo `missing` is not written, the step with
    photo `empty` has an empty sentence."""
    images = tmp_path / "images"
    images.mkdir()
    annotations = []
    for story in ("A", "B"):
        for k in range(5):
            photo = f"{story}{k}"
            annotations.append([{"story_id": story, "photo_flickr_id": photo, "worker_arranged_photo_order": k,
                                 "text": "" if photo == empty else "A red circle."}])
            if photo != missing:
                (images / f"{photo}.jpg").write_bytes(_png(8))
    (tmp_path / "sis.json").write_text(json.dumps({"annotations": annotations}))
    return tmp_path / "sis.json", images


def test_vist_bad_steps_stop_the_voken_dataset_or_are_counted(tmp_path, encoder, tokenizer):
    path, images = _vist(tmp_path, missing="B2", empty="A1")
    stories = read_vist(path, images)
    samples = [s for sid, steps in stories.items() for s in story_samples(sid, steps, PROMPTS)]
    assert len(samples) == 26  # per story: the image task at 5 steps, the other two at 4
    voken_ids = tokenizer.convert_tokens_to_ids(VOKENS)
    with pytest.raises(BadRecord, match=r"record A/1/text: an assistant turn is empty"):
        VokenDataset(samples, encoder, voken_ids, latents=None)
    kept = VokenDataset(samples, encoder, voken_ids, latents=None, skip_bad_records=True)
    # B2's photo is shown in B/2/text and in every sample from step 3 on (6): 7 samples; it is the target
    # of B/2/image and B/2/multimodal: 2 more
    assert dict(kept.skipped) == {"empty answer": 1, "bad image": 7, "bad target image": 2} and len(kept) == 26 - 10
    assert kept.skip_report().startswith("skipped 10 record(s): 7 bad image, 2 bad target image, 1 empty answer "
                                         "(ids: A/1/text, B/2/text, B/3/image")
    target_only = [s for s in samples if s.sample.id in ("B/2/image", "A/0/image")]
    with pytest.raises(BadRecord, match=re.escape(f"record B/2/image: target cannot read image {images / 'B2.jpg'}")):
        VokenDataset(target_only, encoder, voken_ids, latents=None)
    only_b = [s for s in samples if s.sample.id.startswith("B/")]
    with pytest.raises(BadRecord, match=re.escape(f"record B/2/text: cannot read image {images / 'B2.jpg'}")):
        VokenDataset(only_b, encoder, voken_ids, latents=None)


def test_a_vist_story_of_the_wrong_shape_stops_naming_the_file_and_story_or_is_counted(tmp_path):
    path, images = _vist(tmp_path, missing="", empty="")
    data = json.loads(path.read_text())
    data["annotations"][7][0]["worker_arranged_photo_order"] = "third"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"{path}: story B: a worker_arranged_photo_order is not a whole "
                                                   "number")):
        read_vist(path, images)
    skipped = Counter()
    assert list(read_vist(path, images, skipped=skipped)) == ["A"] and skipped == {"malformed annotation": 1}
    del data["annotations"][2][0]["text"]  # story A loses a field, and a step from B goes
    data["annotations"][7][0]["worker_arranged_photo_order"] = 2
    del data["annotations"][9]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"{path}: annotation #2 lacks text")):
        read_vist(path, images)
    skipped = Counter()
    assert read_vist(path, images, skipped=skipped) == {}
    assert skipped == {"malformed annotation": 1, "wrong step count": 1}


def test_coco_for_evaluation_names_the_file_and_annotation(tmp_path):
    images = [{"id": 1, "file_name": "1.jpg", "width": 10, "height": 10}]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": [{"id": 5, "image_id": 1, "caption": "A dog."},
                                                                   {"id": 6, "image_id": 2, "caption": "Lost."}]}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: annotation 6: image_id 2 is not among the file's images")):
        read_coco(tmp_path, path)
    path.write_text(json.dumps({"images": images, "annotations": [{"id": 5, "image_id": 1}]}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: annotation 5: field 'caption' is missing or not text")):
        read_coco(tmp_path, path)
