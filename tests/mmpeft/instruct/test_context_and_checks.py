import json
from collections import Counter

import pytest

from mmpeft.instruct.checks import Rejected, drop_repeated_questions, read_reply
from mmpeft.instruct.context import normalise_box, read_coco_contexts, read_jsonl_contexts
from mmpeft.instruct.prompts import TASKS, detail_questions, load_prompt


def _coco(tmp_path, annotations, captions):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 100} for i in (1, 2, 3, 4)]
    cats = [{"id": 1, "name": "dog"}, {"id": 2, "name": "person"}]
    (tmp_path / "i.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    (tmp_path / "c.json").write_text(json.dumps({"images": images, "annotations": captions}))
    return tmp_path / "c.json", tmp_path / "i.json"


def test_coco_boxes_captions_crowds_and_skips(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 10, 50, 40], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 200, 100], "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 9, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 1, "bbox": [0, 0, -5, 10], "iscrowd": 0},
    ]
    caps = [{"id": 10 + k, "image_id": 1, "caption": f"caption  {k}"} for k in (6, 5, 4, 3, 2, 1, 0)]
    caps += [{"id": 30, "image_id": 2, "caption": "a"}, {"id": 40, "image_id": 3, "caption": "b"}]
    contexts, report = read_coco_contexts(*_coco(tmp_path, anns, caps), skip_bad_records=True)
    (ctx,) = contexts
    assert ctx.image == "1.jpg" and ctx.captions == ["caption 0", "caption 1", "caption 2", "caption 3", "caption 4"]
    assert ctx.boxes == [("dog", [0.1, 0.1, 0.35, 0.5])]
    assert report.skipped == Counter({"unknown category": 1, "malformed box": 1, "no captions": 1})
    assert report.notes["crowd box dropped"] == 1
    assert "dog: [0.100, 0.100, 0.350, 0.500]" in ctx.render(with_boxes=True)
    assert "dog" not in ctx.render(with_boxes=False)
    kept, _ = read_coco_contexts(*_coco(tmp_path, anns[:2], caps[:7]), crowd="keep", skip_bad_records=True)
    assert kept[0].boxes[1] == ("person (group)", [0.0, 0.0, 1.0, 1.0])


def test_box_cap_keeps_the_largest_in_order(tmp_path):
    anns = [{"id": k, "image_id": 1, "category_id": 1, "bbox": [k, 0, 10 + k, 10 + k], "iscrowd": 0} for k in range(5)]
    contexts, report = read_coco_contexts(*_coco(tmp_path, anns, [{"id": 1, "image_id": 1, "caption": "x"}]),
                                          max_boxes=2, skip_bad_records=True)
    assert [b[1][0] for b in contexts[0].boxes] == [0.015, 0.02]
    assert list(report.notes) == ["more than 2 boxes, the largest 2 kept"]


def test_normalise_box_rounds_and_rejects():
    assert normalise_box([10, 20, 30, 40], 300, 200) == [0.033, 0.1, 0.133, 0.3]
    for bad in ([1, 2, 3], [0, 0, 0, 5], [0, 0, float("nan"), 1], [250, 0, 100, 10], "box"):
        with pytest.raises(ValueError):
            normalise_box(bad, 300, 200)


def test_jsonl_input_counts_bad_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([
        json.dumps({"image": "a.jpg", "captions": ["A dog."],
                    "boxes": [{"category": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]}]}),
        json.dumps({"image": "b.jpg", "captions": []}),
        json.dumps({"image": "c.jpg", "captions": ["x"], "boxes": [{"category": "dog", "bbox": [0.5, 0.2, 0.3, 0.4]}]}),
        "{not json",
    ]) + "\n")
    contexts, report = read_jsonl_contexts(path, skip_bad_records=True)
    assert [c.image for c in contexts] == ["a.jpg"] and contexts[0].boxes == [("dog", [0.1, 0.2, 0.3, 0.4])]
    assert report.skipped == Counter({"no captions": 1, "malformed box": 1, "not JSON": 1})


COUNTS, KNOWN = Counter({"dog": 2, "person": 1}), {"dog", "person", "cat"}


@pytest.mark.parametrize("task,text,finish,reason", [
    ("conversation", "Q: What is there?\nA: Two dogs.", "length", "cut off"),
    ("conversation", "", "stop", "empty"),
    ("conversation", "Sure! Here are questions.\nQ: What?\nA: Dogs.", "stop", "malformed"),
    ("conversation", "Q: What?\nQ: Where?\nA: Here.", "stop", "malformed"),
    ("conversation", "Q: What is in the caption?\nA: Dogs.", "stop", "mentions its sources"),
    ("conversation", "Q: Where is the dog?\nA: At [0.1, 0.2].", "stop", "mentions its sources"),
    ("conversation", "Q: Where is the dog?\nA: Its box starts at 0.125.", "stop", "mentions its sources"),
    ("conversation", "Q: What is there?\nA: Three dogs and a person.", "stop", "count contradicts the boxes"),
    ("conversation", "Q: How many dogs are there?\nA: Three.", "stop", "count contradicts the boxes"),
    ("conversation", "Q: Is there a cat?\nA: Yes, two cats.", "stop", "count contradicts the boxes"),
    ("complex_reasoning", "Q: Why?\nA: Because.\nQ: And?\nA: So.", "stop", "malformed"),
    ("detail", "Two dogs play in a park near a person who watches them from", "stop", "cut off"),
    ("detail", "Two dogs.", "stop", "too short"),
    ("refine", "I'm sorry, but I cannot help with editing this description today.", "stop", "apology or refusal"),
    ("detail", "Two dogs play in a park. " + "The grass is green and the sky above it is blue. " * 4, "stop",
     "repetition"),
    ("detail", "Two dogs play " + "and run and play " * 6 + "in the park.", "stop", "repetition"),
    ("refine", "It is red. It is red. It is red. The picture shows a red bus near a street corner.", "stop",
     "repetition"),
    ("conversation", "Q: What is the weather like?\nA: " + "It is sunny and warm outside today. " * 3, "stop",
     "repetition"),
    ("conversation", "Q: How many objects are on the left?\nA: Some objects are there.", "stop", "answer type"),
    ("conversation", "Q: What is the number of people here?\nA: Several.", "stop", "answer type"),
    ("conversation", "Q: Is there a dog?\nA: There is a dog near the fence.", "stop", "answer type"),
    ("conversation", "Q: Are the dogs playing?\nA: The dogs are running.", "stop", "answer type"),
    ("complex_reasoning", "Q: Does the person own the dogs?\nA: It seems likely, as they watch them.", "stop",
     "answer type"),
])
def test_replies_are_rejected_with_their_reason(task, text, finish, reason):
    with pytest.raises(Rejected) as err:
        read_reply(task, text, finish, COUNTS, KNOWN)
    assert err.value.reason == reason


def test_good_replies_are_read():
    text = "Q: How many dogs are there?\nA: Two.\nQ: What are the brown dogs doing?\nA: Playing\nwith a ball."
    assert read_reply("conversation", text, "stop", COUNTS, KNOWN) == [
        ("How many dogs are there?", "Two."), ("What are the brown dogs doing?", "Playing with a ball.")]
    assert read_reply("conversation", "Q: Any black dogs?\nA: One black dog.", "stop", COUNTS, KNOWN)
    para = "Two dogs run across a green field while a person stands near the fence and watches."
    assert read_reply("detail", para, "stop", COUNTS, KNOWN) == [("", para)]


@pytest.mark.parametrize("question,answer", [
    ("How many objects are on the left?", "There are 3 objects."),
    ("How many dogs are there?", "Two."),
    ("How many cats are in the picture?", "There are none."),
    ("In the picture, how many people are there?", "Only one person, standing by the fence."),
    ("Is there a dog?", "Yes, near the fence."),
    ("Are the dogs asleep?", "No. They are running."),
    ("Does the person hold a leash?", "Not that one can see."),
    ("Is the dog brown or black?", "Brown."),  # a choice, not a yes/no question
    ("Can you describe the dogs?", "They are small and brown."),
    ("What are the dogs doing?", "Playing with a ball."),
])
def test_answers_of_the_right_type_are_kept(question, answer):
    assert read_reply("conversation", f"Q: {question}\nA: {answer}", "stop", COUNTS, KNOWN) == [(question, answer)]


def test_prose_that_says_a_thing_twice_is_not_a_loop():
    para = ("Two dogs run across a green field on the left side of the picture. A person stands on the right side "
            "of the picture, near the fence. The dogs look happy. The grass is short and green, and the sky is blue "
            "with a few clouds. The dogs look happy.")
    assert read_reply("detail", para, "stop", COUNTS, KNOWN) == [("", para)]


def test_repeated_questions_are_dropped():
    pairs = [("What colour is the dog?", "Brown."), ("what colour is the dog", "Brown."),
             ("What colour is the big dog?", "Brown."), ("Where is the person?", "Left.")]
    kept, dropped = drop_repeated_questions(pairs)
    assert [q for q, _ in kept] == ["What colour is the dog?", "Where is the person?"] and dropped == 2


def test_prompt_files_load_with_a_version_that_follows_the_bytes(tmp_path):
    for task in (*TASKS, "refine"):
        prompt = load_prompt(task)
        assert prompt.examples and len(prompt.version) == 12
        messages = prompt.messages("ctx")
        assert messages[0]["role"] == "system" and messages[-1] == {"role": "user", "content": "ctx"}
    assert len(detail_questions()) >= 8
    data = json.loads(load_prompt.__globals__["PROMPT_DIR"].joinpath("detail.json").read_text())
    (tmp_path / "detail.json").write_text(json.dumps({**data, "system": data["system"] + " Be brief."}))
    assert load_prompt("detail", tmp_path).version != load_prompt("detail").version
    (tmp_path / "detail.json").write_text(json.dumps({"task": "detail"}))
    with pytest.raises(ValueError, match="detail.json: not a prompt file"):
        load_prompt("detail", tmp_path)
