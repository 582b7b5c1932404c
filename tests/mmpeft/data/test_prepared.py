import json
import os
import pickle
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from mmpeft.data import prepared as prep
from mmpeft.data.conversation import BadRecord, ConversationEncoder
from mmpeft.data.dataset import ConversationDataset
from mmpeft.data.prepared import PreparedConversations, files_fingerprint, prepare_conversations, prepared_folder
from mmpeft.data.readers import iter_llava_json
from mmpeft.data.templates import chat_template
from mmpeft.llava.model import IMAGE_TOKEN
from mmpeft.tiny.zoo.tokenizers import train_lm_tokenizer

N_IMAGE = 4
WORDS = "red blue circle square left right top bottom what where colour is the it a".split()


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_lm_tokenizer([" ".join(WORDS)] * 40 + ["A chat between a curious user and an assistant."], 300)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def _encoder(tokenizer, fmt="vicuna_v1", max_length=256):
    return ConversationEncoder(tokenizer, CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                               chat_template(tokenizer, fmt), IMAGE_TOKEN, N_IMAGE, max_length)


def _records(tmp_path, n, bad=()):
    """`n` LLaVA records over three images (every fifth with two images, of the rest every
    fourth text-only); the ids in `bad` open with an unknown speaker."""
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    for k in range(3):
        Image.new("RGB", (40, 30), (80 * k, 20, 200)).save(folder / f"{k}.png")
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        words = lambda m: " ".join(rng.choice(WORDS, m))  # noqa: E731
        rec = {"id": f"r{i}", "conversations": [
            {"from": "human", "value": f"{words(5)}?"}, {"from": "gpt", "value": words(int(rng.integers(1, 12)))},
            {"from": "human", "value": f"{words(3)}?"}, {"from": "gpt", "value": words(4)}]}
        if i % 5 == 0:
            rec["image"] = ["0.png", "1.png"]
            rec["conversations"][0]["value"] = "<image> and <image>: " + rec["conversations"][0]["value"]
        elif i % 4:
            rec["image"] = f"{i % 3}.png"
            rec["conversations"][0]["value"] = "<image>\n" + rec["conversations"][0]["value"]
        if f"r{i}" in bad:
            rec["conversations"][0]["from"] = "narrator"
        records.append(rec)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, indent=1))
    return path, folder


def _prepare(tmp_path, path, folder, encoder, skip=False, **kw):
    out = prepared_folder(tmp_path / "prepared", files_fingerprint([path]), encoder, True)
    return prepare_conversations(out, lambda: iter_llava_json(path, folder), encoder, skip, source=str(path),
                                 log=lambda _: None, **kw)


@pytest.mark.parametrize("fmt", ["vicuna_v1", "tokenizer"])
def test_a_prepared_set_gives_what_the_in_memory_dataset_gives(tmp_path, tokenizer, fmt, monkeypatch):
    monkeypatch.setattr(prep, "BLOCK_RECORDS", 7)  # several blocks, the last one short
    path, folder = _records(tmp_path, 30)
    encoder = _encoder(tokenizer, fmt)
    ours = PreparedConversations(_prepare(tmp_path, path, folder, encoder), encoder)
    theirs = ConversationDataset(list(iter_llava_json(path, folder)), encoder)
    assert len(ours) == len(theirs) == 30 and len(list((ours.folder).glob("block-*"))) == 5
    assert ours.lengths == theirs.lengths and ours.has_image == theirs.has_image
    assert sum(ours.has_image) == 24 and max(ours.lengths) > min(ours.lengths)
    for i in (0, 1, 4, 13, 29, 25):
        a, b = ours[i], theirs[i]
        assert a["id"] == b["id"] and a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        assert (a["pixel_values"] is None) == (b["pixel_values"] is None)
        if a["pixel_values"] is not None:
            assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert a["input_ids"].count(encoder.image_token_id) == 2 * N_IMAGE  # r25: two images, each a run


def test_a_later_run_reads_the_prepared_set_and_changed_data_or_settings_prepare_anew(tmp_path, tokenizer):
    path, folder = _records(tmp_path, 10)
    encoder = _encoder(tokenizer)
    first = _prepare(tmp_path, path, folder, encoder)

    def unread():
        raise AssertionError("the data was read again")

    again = prepare_conversations(first, unread, encoder, False, log=lambda _: None)
    assert again == first
    assert prepared_folder(tmp_path / "prepared", files_fingerprint([path]), _encoder(tokenizer, max_length=100),
                           True) != first
    os.utime(path, ns=(1, 1))  # the file changed on disk
    assert prepared_folder(tmp_path / "prepared", files_fingerprint([path]), encoder, True) != first


def test_a_killed_preparation_keeps_its_whole_blocks_and_a_rerun_gives_the_same_bytes(tmp_path, tokenizer,
                                                                                        monkeypatch):
    monkeypatch.setattr(prep, "BLOCK_RECORDS", 4)
    path, folder = _records(tmp_path, 18)
    encoder = _encoder(tokenizer)
    whole = _prepare(tmp_path / "whole", path, folder, encoder)
    out = prepared_folder(tmp_path / "killed", files_fingerprint([path]), encoder, True)
    real = prep.prepare_block

    def dies_in_block_three(samples, *args):
        if samples[0].id == "r12":
            raise KeyboardInterrupt
        return real(samples, *args)

    monkeypatch.setattr(prep, "prepare_block", dies_in_block_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_conversations(out, lambda: iter_llava_json(path, folder), encoder, False, source=str(path),
                              log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["block-00000", "block-00001", "block-00002"]
    done = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("block-*/ids.npy")}
    made = []
    monkeypatch.setattr(prep, "prepare_block", lambda samples, *a: made.append(samples[0].id) or real(samples, *a))
    prepare_conversations(out, lambda: iter_llava_json(path, folder), encoder, False, source=str(path),
                          log=lambda _: None)
    assert made == ["r12", "r16"]  # only the blocks that were not written
    kept = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("block-*/ids.npy") if p.parent.name in done}
    assert kept == done  # the finished blocks were not written again
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert all((whole / f).read_bytes() == (out / f).read_bytes() for f in files)


def test_a_bad_record_stops_preparation_naming_file_and_record_or_is_skipped_and_counted(tmp_path, tokenizer,
                                                                                          monkeypatch):
    monkeypatch.setattr(prep, "BLOCK_RECORDS", 4)
    path, folder = _records(tmp_path, 12, bad={"r6", "r9"})
    (folder / "2.png").write_bytes(b"not a png")  # r2 and r11 show it
    encoder = _encoder(tokenizer)
    with pytest.raises(BadRecord, match=rf"{path}: record r2: cannot read image .*2.png"):
        _prepare(tmp_path, path, folder, encoder)
    assert not list((tmp_path / "prepared").glob("*/complete.json"))
    data = PreparedConversations(_prepare(tmp_path, path, folder, encoder, skip=True), encoder)
    assert len(data) == 8 and data.skipped == {"bad image": 2, "unknown speaker": 2}
    assert data.skipped_ids == ["r2", "r6", "r9", "r11"]
    assert "skipped 4 record(s): 2 bad image, 2 unknown speaker" in data.skip_report()
    assert [data[i]["id"] for i in range(len(data))] == ["r0", "r1", "r3", "r4", "r5", "r7", "r8", "r10"]


def test_a_leading_assistant_turn_is_dropped_and_counted(tmp_path, tokenizer):
    path, folder = _records(tmp_path, 4)
    records = json.loads(path.read_text())
    records[1]["conversations"].insert(0, {"from": "gpt", "value": "hello"})
    path.write_text(json.dumps(records))
    encoder = _encoder(tokenizer)
    data = PreparedConversations(_prepare(tmp_path, path, folder, encoder), encoder)
    assert data.dropped_turns == 1 and "1 conversation(s) opened with an assistant turn" in data.skip_report()
    plain = ConversationDataset(list(iter_llava_json(path, folder)), encoder)
    assert data[1]["input_ids"] == plain[1]["input_ids"]


def test_a_prepared_set_travels_to_dataloader_workers_without_its_memory_maps(tmp_path, tokenizer):
    path, folder = _records(tmp_path, 8)
    encoder = _encoder(tokenizer)
    data = PreparedConversations(_prepare(tmp_path, path, folder, encoder), encoder)
    first = data[3]
    copy = pickle.loads(pickle.dumps(data))
    assert copy._open == {} and copy[3]["input_ids"] == first["input_ids"]
    shapes = [len(data[i]["input_ids"]) for i in range(8)]
    assert shapes == data.lengths


def test_images_and_their_digests_come_from_preparation(tmp_path, tokenizer):
    from mmpeft.data.feature_cache import image_digest

    path, folder = _records(tmp_path, 6)
    encoder = _encoder(tokenizer)
    data = PreparedConversations(_prepare(tmp_path, path, folder, encoder), encoder)
    pairs = list(data.images())
    assert len(pairs) == 2 + 1 + 1 + 1 + 0 + 2  # r0 and r5 two, r4 none
    assert all(digest == image_digest(image) for digest, image in pairs)


_RANK = """
import json, os, sys
rank, (folder, port, data, images, block) = int(sys.argv[1]), sys.argv[2:7]
os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
import torch.distributed as dist
from mmpeft.data import prepared as prep
from tests.mmpeft.data.test_prepared import _encoder, _tokenizer_for_ranks
from mmpeft.data.readers import iter_llava_json
prep.BLOCK_RECORDS = int(block)
dist.init_process_group("gloo", rank=rank, world_size=2)
encoder = _encoder(_tokenizer_for_ranks())
made = []
real = prep.prepare_block
prep.prepare_block = lambda samples, *a: made.append(samples[0].id) or real(samples, *a)
out = prep.prepare_conversations(prep.Path(folder) / "set", lambda: iter_llava_json(data, images), encoder, False,
                                 rank=rank, world=2, log=lambda _: None)
rows = prep.PreparedConversations(out, encoder)
ids = [rows[i]["input_ids"] for i in range(len(rows))]
json.dump({"made": made, "ids": ids}, open(f"{folder}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def _tokenizer_for_ranks():
    tok = train_lm_tokenizer([" ".join(WORDS)] * 40 + ["A chat between a curious user and an assistant."], 300)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def test_two_ranks_each_prepare_half_the_blocks_and_both_read_the_whole_set(tmp_path, two_ranks, monkeypatch):
    monkeypatch.setattr(prep, "BLOCK_RECORDS", 3)
    path, folder = _records(tmp_path, 11)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    monkeypatch.setenv("PYTHONPATH", str(prep.Path(__file__).parents[3]))
    results = two_ranks(_RANK, lambda r: [port, str(path), str(folder), "3"])
    assert results[0]["made"] == ["r0", "r6"] and results[1]["made"] == ["r3", "r9"]
    encoder = _encoder(_tokenizer_for_ranks())
    alone = ConversationDataset(list(iter_llava_json(path, folder)), encoder)
    assert results[0]["ids"] == results[1]["ids"] == [alone[i]["input_ids"] for i in range(11)]
