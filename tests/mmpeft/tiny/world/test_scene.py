import random

from mmpeft.tiny.world.scene import COLOURS, Thing, captions, qa_pairs, render, sample_scene
from mmpeft.tiny.world.story import sample_story
from mmpeft.tiny.zoo.diffusion import pixel_attributes


def test_scene_objects_have_distinct_cells_and_names():
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        assert 1 <= len(scene) <= 3
        assert len({(t.row, t.col) for t in scene}) == len(scene)
        assert len({t.name for t in scene}) == len(scene)


def test_render_draws_the_object_where_and_how_it_is():
    thing = Thing("blue", "square", "large", row=0, col=2)
    seen = pixel_attributes(render([thing], 64))
    assert seen == {"colour": "blue", "shape": "square", "where": "top right"}
    seen = pixel_attributes(render([Thing("yellow", "triangle", "large", row=2, col=0)], 64))
    assert seen == {"colour": "yellow", "shape": "triangle", "where": "bottom left"}


def test_questions_have_definite_answers():
    scene = [Thing("red", "circle", "small", 0, 0), Thing("green", "square", "large", 1, 2)]
    pairs = {p["q"]: p["a"] for p in qa_pairs(scene, random.Random(1))}
    assert pairs["How many objects are in the image?"] == "two"
    assert pairs["What colour is the circle?"] == "red"
    assert pairs["What shape is the green object?"] == "square"
    assert pairs["Where is the red circle?"] == "top left"
    assert pairs["Is the red circle to the left of the green square?"] == "yes"
    assert pairs["Is the green square to the left of the red circle?"] == "no"
    assert pairs["Is the green square small or large?"] == "large"


def test_captions_are_five_and_mention_every_object():
    scene = [Thing("red", "circle", "small", 0, 0), Thing("orange", "triangle", "large", 2, 1)]
    caps = captions(scene, random.Random(2))
    assert len(caps) == 5 and len(set(caps)) == 5
    assert all("red circle" in c.lower() and "orange triangle" in c.lower() for c in caps)


def test_story_sentences_follow_the_scenes():
    for seed in range(50):
        steps = sample_story(random.Random(seed))
        assert len(steps) == 5
        for (before, _), (after, sentence) in zip(steps, steps[1:], strict=False):
            if sentence.endswith("appears at the " + after[-1].where + "."):
                assert len(after) == len(before) + 1
            elif "disappears" in sentence:
                assert len(after) == len(before) - 1
            elif " turns " in sentence:
                colour = sentence.rstrip(".").split(" turns ")[1]
                assert colour in COLOURS and colour in {t.colour for t in after}
            else:
                assert len(after) == len(before)
