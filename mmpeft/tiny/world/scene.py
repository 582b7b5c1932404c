"""Scenes of the tiny world: a few coloured shapes on a plain background.

A scene is a list of `Thing`s, each in its own cell of a 3 x 3 grid, so positions are
unambiguous and objects never overlap. Everything the world says about a scene (captions,
questions, story sentences) is derived from it here, so that every answer is checkable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "large": 0.25}  # side of the shape as a fraction of the image side
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
BACKGROUND = (24, 24, 24)
NUMBER_WORDS = ("zero", "one", "two", "three")
MAX_OBJECTS = 3
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Thing:
    """One object of a scene: attributes plus its grid cell and a small jitter in pixels
    of a 64 px image (scaled with the image)."""

    colour: str
    shape: str
    size: str
    row: int
    col: int
    dx: float = 0.0
    dy: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def where(self) -> str:
        return f"{ROWS[self.row]} {COLUMNS[self.col]}"

    def describe(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


def sample_thing(rng: random.Random, taken_cells: set, taken_names: set) -> Thing:
    """A new object in a free cell whose colour and shape pair is not in the scene yet."""
    free_cells = [(r, c) for r in range(3) for c in range(3) if (r, c) not in taken_cells]
    row, col = rng.choice(free_cells)
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if f"{colour} {shape}" not in taken_names:
            break
    return Thing(colour, shape, rng.choice(list(SIZES)), row, col,
                 round(rng.uniform(-2, 2), 2), round(rng.uniform(-2, 2), 2))


def sample_scene(rng: random.Random, n_objects: int | None = None) -> list[Thing]:
    """1 to 3 objects, each in its own cell, no two sharing colour and shape."""
    n = n_objects or rng.randint(1, MAX_OBJECTS)
    things: list[Thing] = []
    for _ in range(n):
        things.append(sample_thing(rng, {(t.row, t.col) for t in things}, {t.name for t in things}))
    return things


def box(thing: Thing, image_size: int) -> tuple[float, float, float, float]:
    """Pixel box `(x1, y1, x2, y2)` of an object in an image of side `image_size`."""
    cell = image_size / 3
    scale = image_size / 64
    cx = (thing.col + 0.5) * cell + thing.dx * scale
    cy = (thing.row + 0.5) * cell + thing.dy * scale
    half = SIZES[thing.size] * image_size / 2
    return (cx - half, cy - half, cx + half, cy + half)


def render(scene: list[Thing], image_size: int = 64) -> Image.Image:
    """Draw the scene, supersampled then reduced so edges are smooth but deterministic."""
    big = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for thing in scene:
        x1, y1, x2, y2 = (v * _SUPERSAMPLE for v in box(thing, image_size))
        fill = COLOURS[thing.colour]
        if thing.shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif thing.shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: list[Thing], rng: random.Random) -> list[str]:
    """Five captions in different wordings, as COCO gives five per image; the first names
    every object's size, colour, shape and cell."""
    order = list(scene)
    rng.shuffle(order)
    n = len(scene)
    plain = _join([t.describe() for t in order])
    placed = _join([f"{t.describe()} at the {t.where}" for t in order])
    count = f"{NUMBER_WORDS[n]} object{'s' if n > 1 else ''}"
    return [
        placed[0].upper() + placed[1:] + ".",
        f"{count.capitalize()} on a dark background: {plain}.",
        f"A picture of {plain}.",
        "There " + ("is " if n == 1 else "are ") + placed + ".",
        _join([f"{t.colour} {t.shape}" for t in order]).capitalize() + ".",
    ]


def qa_pairs(scene: list[Thing], rng: random.Random) -> list[dict]:
    """Questions with one-word or two-word answers, each tagged with its type and the
    number of answers that type allows (for chance accuracy)."""
    pairs = []
    n = len(scene)
    pairs.append({"type": "count", "q": "How many objects are in the image?",
                  "a": NUMBER_WORDS[n], "options": MAX_OBJECTS})
    shapes = [t.shape for t in scene]
    colours = [t.colour for t in scene]
    for thing in scene:
        if shapes.count(thing.shape) == 1:
            pairs.append({"type": "colour", "q": f"What colour is the {thing.shape}?",
                          "a": thing.colour, "options": len(COLOURS)})
        if colours.count(thing.colour) == 1:
            pairs.append({"type": "shape", "q": f"What shape is the {thing.colour} object?",
                          "a": thing.shape, "options": len(SHAPES)})
        pairs.append({"type": "size", "q": f"Is the {thing.name} small or large?",
                      "a": thing.size, "options": len(SIZES)})
        pairs.append({"type": "position", "q": f"Where is the {thing.name}?",
                      "a": thing.where, "options": len(ROWS) * len(COLUMNS)})
    for a in scene:
        for b in scene:
            if a is not b and a.col != b.col:
                pairs.append({"type": "relation", "q": f"Is the {a.name} to the left of the {b.name}?",
                              "a": "yes" if a.col < b.col else "no", "options": 2})
    present = rng.random() < 0.5
    if present:
        asked = rng.choice(scene).name
    else:
        names = {t.name for t in scene}
        asked = rng.choice([f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in names])
    pairs.append({"type": "exists", "q": f"Is there a {asked} in the image?",
                  "a": "yes" if present else "no", "options": 2})
    return pairs


def text_description(scene: list[Thing]) -> str:
    """The scene in one sentence, used for text-only records and the LM's training text."""
    return _join([f"{t.describe()} at the {t.where}" for t in scene]).capitalize() + "."
