"""data_gen's input readers under both settings of `skip_bad_records`: off, the first bad
image stops the reading naming the file, the record and the reason (the command line adds
the option that skips); on, bad images are left out and counted by reason."""

import json
import re
from collections import Counter

import pytest

from mmpeft.instruct.context import BadInput, read_coco_contexts, read_jsonl_contexts

GOOD = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 10, 50, 40], "iscrowd": 0}


def _coco(tmp_path, bad_annotation: dict | None, caption_images=(1, 2)):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 100} for i in (1, 2)]
    annotations = [GOOD] + ([bad_annotation] if bad_annotation else [])
    (tmp_path / "i.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                 "categories": [{"id": 1, "name": "dog"}]}))
    captions = [{"id": 10 + i, "image_id": i, "caption": "A dog."} for i in caption_images]
    (tmp_path / "c.json").write_text(json.dumps({"images": images, "annotations": captions}))
    return tmp_path / "c.json", tmp_path / "i.json"


@pytest.mark.parametrize("bad,captioned,file,record,reason,kind", [
    ({"id": 7, "image_id": 2, "category_id": 9, "bbox": [0, 0, 10, 10]}, (1, 2), "i.json", "annotation 7 (image 2)",
     "unknown category id 9", "unknown category"),
    ({"id": 8, "image_id": 2, "category_id": 1, "bbox": [190, 0, 50, 10]}, (1, 2), "i.json", "annotation 8 (image 2)",
     "box [190, 0, 50, 10] is empty or outside the 200x100 image", "malformed box"),
    (None, (1,), "c.json", "image 2", "no captions", "no captions"),
])
def test_a_bad_coco_image_stops_the_reading_or_is_counted(tmp_path, bad, captioned, file, record, reason, kind):
    files = _coco(tmp_path, bad, captioned)
    with pytest.raises(BadInput, match=f"^{re.escape(f'{tmp_path / file}: {record}: {reason}')}$") as err:
        read_coco_contexts(*files)
    assert err.value.kind == kind
    contexts, report = read_coco_contexts(*files, skip_bad_records=True)
    assert [c.image_id for c in contexts] == ["1"] and contexts[0].boxes == [("dog", [0.1, 0.1, 0.35, 0.5])]
    assert report.skipped == Counter({kind: 1}) and report.examples == {kind: ["2"]}
    assert report.lines() == [f"skipped 1 image(s): {kind} (e.g. 2)"]


JSONL_LINES = [
    ('{"image": "b.jpg", "capt', "not JSON", "not JSON (Unterminated string"),
    ("[1, 2]", "not JSON", "not a JSON object"),
    (json.dumps({"captions": ["A dog."]}), "no image", "no 'image' path"),
    (json.dumps({"image": "b.jpg", "captions": "A dog."}), "no captions", "no captions"),
    (json.dumps({"image": "b.jpg", "captions": ["A dog."], "boxes": [{"category": "dog", "bbox": [0.5, 0, 0.2, 1]}]}),
     "malformed box", "box {'category': 'dog', 'bbox': [0.5, 0, 0.2, 1]} is not"),
]


@pytest.mark.parametrize("line,kind,reason", JSONL_LINES)
def test_a_bad_jsonl_line_stops_the_reading_or_is_counted(tmp_path, line, kind, reason):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"image": "a.jpg", "captions": ["A dog."]}) + "\n" + line + "\n")
    with pytest.raises(BadInput, match=f"^{re.escape(f'{path}: line 2: {reason}')}") as err:
        read_jsonl_contexts(path)
    assert err.value.kind == kind
    contexts, report = read_jsonl_contexts(path, skip_bad_records=True)
    assert [c.image for c in contexts] == ["a.jpg"] and report.skipped == Counter({kind: 1})


def test_the_command_stops_with_one_line_or_skips_with_the_option(tmp_path):
    from mmpeft.data_gen.make_llava_instruct import main, parse_args, read_input

    captions, instances = _coco(tmp_path, {"id": 7, "image_id": 2, "category_id": 9, "bbox": [0, 0, 10, 10]})
    argv = ["--captions", str(captions), "--instances", str(instances), "--output", str(tmp_path / "out.json")]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--dry-run", "--model", str(tmp_path / "no-model")])  # stops before any model is read
    assert stop.value.code == (f"input: {instances}: annotation 7 (image 2): unknown category id 9; "
                               "--skip-bad-records leaves such images out and counts them")
    contexts, report, _ = read_input(parse_args([*argv, "--skip-bad-records"]))
    assert [c.image_id for c in contexts] == ["1"] and report.skipped == Counter({"unknown category": 1})
