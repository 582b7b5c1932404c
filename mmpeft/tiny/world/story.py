"""Five-step stories: a scene that changes one thing per step, one sentence per step."""

from __future__ import annotations

import dataclasses
import random

from mmpeft.tiny.world.scene import COLOURS, MAX_OBJECTS, SIZES, Thing, sample_scene, sample_thing, text_description

STORY_STEPS = 5


def _change(scene: list[Thing], rng: random.Random) -> tuple[list[Thing], str]:
    """Apply one random change and say what happened."""
    kinds = ["move", "recolour", "resize"]
    if len(scene) < MAX_OBJECTS:
        kinds.append("appear")
    if len(scene) > 1:
        kinds.append("vanish")
    kind = rng.choice(kinds)
    cells = {(t.row, t.col) for t in scene}
    names = {t.name for t in scene}
    if kind == "appear":
        new = sample_thing(rng, cells, names)
        return scene + [new], f"{new.describe().capitalize()} appears at the {new.where}."
    i = rng.randrange(len(scene))
    old = scene[i]
    rest = scene[:i] + scene[i + 1:]
    if kind == "vanish":
        return rest, f"The {old.name} disappears."
    if kind == "move":
        free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in cells]
        row, col = rng.choice(free)
        new = dataclasses.replace(old, row=row, col=col)
        return rest[:i] + [new] + rest[i:], f"The {old.name} moves to the {new.where}."
    if kind == "recolour":
        taken = {t.name for t in rest}
        colours = [c for c in COLOURS if c != old.colour and f"{c} {old.shape}" not in taken]
        new = dataclasses.replace(old, colour=rng.choice(colours))
        return rest[:i] + [new] + rest[i:], f"The {old.name} turns {new.colour}."
    other = next(s for s in SIZES if s != old.size)
    new = dataclasses.replace(old, size=other)
    verb = "grows" if other == "large" else "shrinks"
    return rest[:i] + [new] + rest[i:], f"The {old.name} {verb}."


def sample_story(rng: random.Random) -> list[tuple[list[Thing], str]]:
    """Five (scene, sentence) steps; the first sentence describes the opening scene."""
    scene = sample_scene(rng, rng.randint(1, 2))
    opening = text_description(scene)
    steps = [(scene, "There is " + opening[0].lower() + opening[1:])]
    for _ in range(STORY_STEPS - 1):
        scene, sentence = _change(scene, rng)
        steps.append((scene, sentence))
    return steps
