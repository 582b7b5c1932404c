import json

import pytest
from transformers import CLIPImageProcessorPil

from mmpeft.data.conversation import BadRecord, ConversationEncoder, Sample, ShardMember
from mmpeft.data.readers import read_caption_jsonl, read_caption_shards, read_llava_json, read_messages_dataset
from mmpeft.data.templates import chat_template
from mmpeft.llava.model import IMAGE_TOKEN
from mmpeft.tiny.zoo.tokenizers import train_lm_tokenizer

N_IMAGE = 4


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["What colour is the circle?", "Red.", "Where is it?", "Top left.", "user", "assistant",
             "A chat between a curious user and an artificial intelligence assistant."] * 20
    tok = train_lm_tokenizer(texts, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def _encoder(tokenizer, fmt="tokenizer", max_length=512):
    return ConversationEncoder(tokenizer, CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                               chat_template(tokenizer, fmt), IMAGE_TOKEN, N_IMAGE, max_length)


TWO_TURNS = Sample("r1", [
    {"role": "user", "content": "<image>\nWhat colour is the circle?"},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Where is it?"},
    {"role": "assistant", "content": "Top left."},
], ["unused.jpg"])


@pytest.mark.parametrize("fmt", ["tokenizer", "vicuna_v1"])
def test_labels_cover_exactly_the_answers_and_their_end_token(tokenizer, fmt):
    enc = _encoder(tokenizer, fmt).encode_text(TWO_TURNS)
    ids, labels = enc["input_ids"], enc["labels"]
    eos = tokenizer.eos_token_id
    kept = [(i, lab) for i, lab in zip(ids, labels, strict=True) if lab != -100]
    assert all(i == lab for i, lab in kept)
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for a in ("Red.", "Top left.")]
    if fmt == "vicuna_v1":  # the answer follows "ASSISTANT: ", so the first word carries its leading space
        answers = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [eos] for a in ("Red.", "Top left.")]
        assert tokenizer.decode([i for i, _ in kept]).replace(" ", "") == "Red.<|im_end|>Topleft.<|im_end|>"
    else:
        assert [i for i, _ in kept] == answers[0] + answers[1]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == N_IMAGE
    first = ids.index(image_id)
    assert ids[first:first + N_IMAGE] == [image_id] * N_IMAGE
    assert all(labels[k] == -100 for k in range(len(ids)) if ids[k] == image_id)


def test_plain_format_is_image_then_caption(tokenizer):
    sample = Sample("c1", [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "Red."}], ["x"])
    enc = _encoder(tokenizer, "plain").encode_text(sample)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    caption = tokenizer("Red.\n", add_special_tokens=False)["input_ids"]  # LLaVA's separator, not EOS
    assert enc["input_ids"] == [image_id] * N_IMAGE + caption
    assert enc["labels"] == [-100] * N_IMAGE + caption


def test_truncation_keeps_images_whole_and_answers_present(tokenizer):
    full = _encoder(tokenizer).encode_text(TWO_TURNS)
    cut = _encoder(tokenizer, max_length=len(full["input_ids"]) - 3).encode_text(TWO_TURNS)
    assert cut["input_ids"] == full["input_ids"][:-3]
    with pytest.raises(BadRecord, match="record r1: .*cut an image"):
        _encoder(tokenizer, max_length=3).encode_text(TWO_TURNS)
    image_at_end = Sample("r2", [{"role": "user", "content": "What colour is the circle?"},
                                 {"role": "assistant", "content": "Red."},
                                 {"role": "user", "content": "Where is it?\n<image>"},
                                 {"role": "assistant", "content": "Top left."}], ["x"])
    with pytest.raises(BadRecord, match="cut an image"):
        _encoder(tokenizer, max_length=20).encode_text(image_at_end)
    question_only = Sample("r3", [{"role": "user", "content": "What colour is the circle? " * 10},
                                  {"role": "assistant", "content": "Red."}], [])
    with pytest.raises(BadRecord, match="no answer tokens left within max_length 12") as err:
        _encoder(tokenizer, max_length=12).encode_text(question_only)
    assert err.value.kind == "empty answer after truncation"


@pytest.mark.parametrize("messages,images,kind", [
    ([{"role": "assistant", "content": "Red."}], [], "no human turn"),
    ([{"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "Red."}], ["a"],
     "more <image> markers than images"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], [], "empty answer"),
])
def test_bad_records_are_named_with_their_reason(tokenizer, messages, images, kind):
    with pytest.raises(BadRecord) as err:
        _encoder(tokenizer).encode_text(Sample("bad-7", messages, images))
    assert err.value.kind == kind and "record bad-7" in str(err.value)


def test_missing_image_names_record_and_file(tokenizer, tmp_path):
    with pytest.raises(BadRecord, match=f"record r1: cannot read image {tmp_path}/nope.jpg"):
        _encoder(tokenizer).images(Sample("r1", TWO_TURNS.messages, [tmp_path / "nope.jpg"]))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BadRecord, match="broken.jpg"):
        _encoder(tokenizer).images(Sample("r1", TWO_TURNS.messages, [tmp_path / "broken.jpg"]))


def test_readers_agree_on_the_world(small_world):
    samples = read_llava_json(small_world / "llava/train.json", small_world / "coco")
    raw = json.loads((small_world / "llava/train.json").read_text())
    assert [s.id for s in samples] == [r["id"] for r in raw]
    for s, r in zip(samples, raw, strict=True):
        assert [m["content"] for m in s.messages] == [t["value"] for t in r["conversations"]]
        assert s.images == ([small_world / "coco" / r["image"]] if "image" in r else [])
    pairs = read_caption_shards(str(small_world / "wds/train/*.tar"))
    assert len(pairs) == len(raw)
    assert pairs[0].messages[0]["content"] == "<image>" and pairs[0].messages[1]["content"].endswith(".")
    assert isinstance(pairs[0].images[0], ShardMember)  # read in place when a batch needs it


def test_messages_dataset_and_caption_jsonl(tmp_path):
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
             "images": ["a.jpg"]}]
    (sample,) = read_messages_dataset(rows)
    assert sample.messages == [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}]
    (tmp_path / "c.jsonl").write_text('{"image": "a.jpg", "caption": "A red circle."}\n{"image": "b.jpg"}\n')
    good, bad = read_caption_jsonl(tmp_path / "c.jsonl", tmp_path)  # a bad line is kept for the dataset to judge
    assert good.problem is None and bad.problem == ("line 2 needs 'image' and 'caption'", "malformed")


def _image(tmp_path, name="a.png"):
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / name)
    return name


def _bad_llava_json(tmp_path):
    image = _image(tmp_path)
    good = {"id": "ok", "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                                          {"from": "gpt", "value": "Red."}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good, {"id": "x9", "conversations": [{"from": "robot", "value": "hi"}]},
                                {"id": "x10", "conversations": "hi"}]))
    return path


def test_a_bad_llava_record_stops_the_run_naming_file_and_record_or_is_skipped_and_counted(tokenizer, tmp_path):
    from mmpeft.data.dataset import ConversationDataset

    path = _bad_llava_json(tmp_path)
    samples = read_llava_json(path, tmp_path)
    with pytest.raises(BadRecord, match=r"bad.json: record x9: unknown speaker\(s\) \['robot'\]"):
        ConversationDataset(samples, _encoder(tokenizer), source=str(path))
    kept = ConversationDataset(samples, _encoder(tokenizer), skip_bad_records=True, source=str(path))
    assert len(kept) == 1 and dict(kept.skipped) == {"unknown speaker": 1, "malformed": 1}
    assert kept.skipped_ids == ["x9", "x10"]


def test_caption_shard_keys_without_a_caption_or_an_image_are_bad_records(tokenizer, tmp_path):
    import io
    import tarfile

    from mmpeft.data.dataset import ConversationDataset

    png = (tmp_path / _image(tmp_path)).read_bytes()
    with tarfile.open(tmp_path / "s0.tar", "w") as tar:
        for name, data in (("k1.png", png), ("k1.txt", b"Red."), ("k2.png", png), ("k3.txt", b"Lost.")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = read_caption_shards(str(tmp_path / "s*.tar"))
    assert [(s.id, s.problem) for s in samples] == [
        ("s0.tar/k1", None), ("s0.tar/k2", ("no caption (.txt)", "no caption")),
        ("s0.tar/k3", ("no image", "no image"))]
    with pytest.raises(BadRecord, match="s0.tar/k2: no caption"):
        ConversationDataset(samples, _encoder(tokenizer))
    kept = ConversationDataset(samples, _encoder(tokenizer), skip_bad_records=True)
    assert len(kept) == 1 and dict(kept.skipped) == {"no caption": 1, "no image": 1}


def test_a_conversation_opening_with_an_assistant_turn_loses_it_as_llava_does(tokenizer, tmp_path):
    from mmpeft.data.dataset import ConversationDataset

    image = tmp_path / _image(tmp_path)
    opening = Sample("a1", [{"role": "assistant", "content": "Hello."}, *TWO_TURNS.messages], [image])
    dataset = ConversationDataset([opening], _encoder(tokenizer))
    assert dataset.dropped_turns == 1 and dataset.items[0][0].messages == TWO_TURNS.messages
    assert "1 conversation(s) opened with an assistant turn, dropped as LLaVA does" in dataset.skip_report()


def test_pad_to_square_centres_the_image_on_the_mean_colour(tokenizer, tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "wide.png")
    encoder = ConversationEncoder(tokenizer, CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                   crop_size={"height": 32, "width": 32}),
                                  chat_template(tokenizer, "tokenizer"), IMAGE_TOKEN, N_IMAGE, 512, pad_to_square=True)
    sample = Sample("w", TWO_TURNS.messages, [tmp_path / "wide.png"])
    pixels = encoder.images(sample)[0]  # normalised: the mean colour becomes 0
    assert pixels.shape == (3, 32, 32)
    assert pixels[:, :6].abs().max() < 0.05 and pixels[:, -6:].abs().max() < 0.05  # the padding, top and bottom
    assert pixels[0, 12:20].min() > 1.5 and pixels[1, 12:20].max() < -1.5  # the red middle band, whole width
    cropped = _encoder(tokenizer).images(sample)[0]  # without padding the centre crop is all red
    assert cropped[0].min() > 1.5


def test_messages_dataset_from_hugging_face_datasets(tmp_path):
    import datasets
    from PIL import Image

    image = Image.new("RGB", (8, 8), (0, 0, 255))
    hf = datasets.Dataset.from_dict({
        "id": ["a", "b"],
        "messages": [[{"role": "user", "content": [{"type": "text", "text": "Colour?"}, {"type": "image"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
                     [{"role": "user", "content": [{"type": "text", "text": "Hello"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]}]],
        "images": [[image], []],
    }).cast_column("images", datasets.Sequence(datasets.Image()))
    hf.save_to_disk(tmp_path / "ds")
    samples = read_messages_dataset(datasets.load_from_disk(tmp_path / "ds"), id_column="id")
    assert [s.id for s in samples] == ["a", "b"]
    assert samples[0].messages[0]["content"] == "Colour?<image>" and samples[1].images == []
    from mmpeft.data.conversation import open_image

    assert open_image(samples[0].images[0], "a").getpixel((3, 3)) == (0, 0, 255)
    bad = [{"messages": [{"role": "robot", "content": "x"}], "images": []}]
    assert read_messages_dataset(bad)[0].problem == ("unknown role(s) ['robot']", "unknown speaker")
