import filecmp
import json
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from mmpeft.tiny.world import build_world
from mmpeft.tiny.world.scene import COLOURS, SHAPES, SIZES


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_same_seed_gives_byte_identical_files(small_world, small_world_spec, tmp_path):
    again = build_world(tmp_path / "again", small_world_spec)
    names = _files(small_world)
    assert names == _files(again)
    match, mismatch, errors = filecmp.cmpfiles(small_world, again, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names)


def test_other_seed_gives_other_world(small_world, small_world_spec, tmp_path):
    other = build_world(tmp_path / "other", replace(small_world_spec, seed=4))
    a = (small_world / "coco/annotations/captions_train.json").read_bytes()
    assert a != (other / "coco/annotations/captions_train.json").read_bytes()


def test_refuses_a_folder_holding_another_world(small_world, small_world_spec):
    with pytest.raises(FileExistsError, match="different world"):
        build_world(small_world, replace(small_world_spec, seed=9))


def test_rebuild_of_same_spec_is_a_no_op(small_world, small_world_spec):
    before = (small_world / "world.json").stat().st_mtime_ns
    assert build_world(small_world, small_world_spec) == small_world
    assert (small_world / "world.json").stat().st_mtime_ns == before


def test_coco_files_read_back_with_json_and_pil(small_world, small_world_spec):
    for split, n in zip(("train", "val", "test"), small_world_spec.images, strict=True):
        caps = json.loads((small_world / f"coco/annotations/captions_{split}.json").read_text())
        inst = json.loads((small_world / f"coco/annotations/instances_{split}.json").read_text())
        assert len(caps["images"]) == n == len(inst["images"])
        per_image = {}
        for ann in caps["annotations"]:
            per_image.setdefault(ann["image_id"], []).append(ann["caption"])
        assert all(len(v) == 5 for v in per_image.values()) and len(per_image) == n
        assert [c["name"] for c in inst["categories"]] == list(SHAPES)
        for img in inst["images"]:
            with Image.open(small_world / "coco" / split / img["file_name"]) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"]) == (64, 64)
        for ann in inst["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and ann["iscrowd"] == 0
            assert ann["attributes"]["colour"] in COLOURS and ann["attributes"]["size"] in SIZES


def test_captions_name_the_objects_the_boxes_hold(small_world):
    caps = json.loads((small_world / "coco/annotations/captions_val.json").read_text())
    inst = json.loads((small_world / "coco/annotations/instances_val.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    for img in inst["images"]:
        objects = sorted(f"{a['attributes']['colour']} {names[a['category_id']]}"
                         for a in inst["annotations"] if a["image_id"] == img["id"])
        for cap in (a["caption"] for a in caps["annotations"] if a["image_id"] == img["id"]):
            said = sorted(re.findall(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})", cap.lower()))
            assert [" ".join(s) for s in said] == objects, cap


def test_llava_records_follow_the_llava_format(small_world, small_world_spec):
    records = json.loads((small_world / "llava/train.json").read_text())
    assert len(records) == small_world_spec.images[0]
    for rec in records:
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        markers = sum(t["value"].count("<image>") for t in turns)
        if "image" in rec:
            assert markers == 1 and "<image>" in turns[0]["value"]
            assert (small_world / "coco" / rec["image"]).is_file()
        else:
            assert markers == 0
    firsts = [r["conversations"][0]["value"] for r in records if "image" in r]
    assert any(v.startswith("<image>") for v in firsts) and any(v.endswith("<image>") for v in firsts)


def test_eval_answers_agree_with_the_boxes(small_world, small_world_spec):
    inst = json.loads((small_world / "coco/annotations/instances_test.json").read_text())
    counts = {}
    for ann in inst["annotations"]:
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
    words = ["zero", "one", "two", "three"]
    rows = [json.loads(line) for line in (small_world / "eval/test_qa.jsonl").read_text().splitlines()]
    assert len(rows) == small_world_spec.images[2]
    checked = 0
    for row in rows:
        image_id = int(Path(row["image"]).stem)
        if row["type"] == "count":
            assert row["a"] == words[counts[image_id]]
            checked += 1
    assert checked > 0


def test_webdataset_shards_are_laid_out_as_img2dataset_writes_them(small_world, small_world_spec):
    shards = sorted((small_world / "wds/train").glob("*.tar"))
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]  # 40 pairs, 16 a shard
    total = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            keys = sorted({n.split(".")[0] for n in names})
            assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")]
            for key in keys:
                assert re.fullmatch(rf"{shard.stem}\d{{4}}", key)
                meta = json.loads(tar.extractfile(f"{key}.json").read())
                assert meta["key"] == key and meta["status"] == "success"
                assert tar.extractfile(f"{key}.txt").read().decode() == meta["caption"]
                with Image.open(tar.extractfile(f"{key}.jpg")) as im:
                    assert im.size == (64, 64)
            total += len(keys)
        stats = json.loads((shard.parent / f"{shard.stem}_stats.json").read_text())
        assert stats["successes"] == len(keys)
    assert total == small_world_spec.images[0]


def test_vist_stories_have_five_ordered_steps_with_images(small_world, small_world_spec):
    data = json.loads((small_world / "vist/sis/train.story-in-sequence.json").read_text())
    steps = [a[0] for a in data["annotations"]]
    stories = {}
    for s in steps:
        stories.setdefault(s["story_id"], []).append(s)
    assert len(stories) == small_world_spec.stories[0]
    for story in stories.values():
        assert [s["worker_arranged_photo_order"] for s in story] == [0, 1, 2, 3, 4]
        for s in story:
            assert (small_world / "vist/images/train" / f"{s['photo_flickr_id']}.jpg").is_file()
            assert s["text"] == s["original_text"].lower()
    assert {i["id"] for i in data["images"]} == {s["photo_flickr_id"] for s in steps}
