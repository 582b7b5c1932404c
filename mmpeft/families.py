"""The families mmpeft trains, and what the shared machinery needs to know of each.

Loading, export, the Hub's model cards and the tiny pipeline's figures table read a
family's `Family` record and hold no per-family code. A family lives in its own package
(`mmpeft/llava/`, `mmpeft/gill/`, ...) whose `__init__.py` defines `FAMILY = Family(...)`;
the one line that adds a family is its package's name in `FAMILY_PACKAGES` below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "mmpeft_config.json"  # every run and checkpoint folder: sources and settings to rebuild

FAMILY_PACKAGES = (
    "mmpeft.llava",
    "mmpeft.minigpt5",
    "mmpeft.gill",
    "mmpeft.flamingo",
    "mmpeft.general_gpt",
)


@dataclass
class Loaded:
    """A rebuilt run: `model` (eval mode), `processor` (a `LlavaProcessor`; the tokenizer
    for GILL and General-GPT; for Flamingo an object with `tokenizer` and
    `image_processor`), the run's `settings`, and Stable Diffusion's `pipeline` for
    MiniGPT-5 (GILL's recipes load their pipeline from `settings['sources']`)."""

    model: Any
    processor: Any
    settings: dict
    pipeline: Any = None
    folder: Path = field(default=None)


@dataclass(frozen=True)
class CardMetric:
    """A `metrics.json` key that goes into a model card's model-index."""

    key: str
    metric: str  # the Hub's metric type: accuracy, recall, loss, ...
    task: str  # the Hub's task type
    name: str  # what it is, in words


# (run name, figure, value, reference): one row of the pipeline's figures table
FigureRow = tuple[str, str, float, str]


@dataclass(frozen=True)
class Family:
    """What one family tells the shared machinery.

    `load(folder, lm, clip, diffusion, base_kwargs)` rebuilds a run folder as `Loaded`;
    `export(folder, out, lm, clip)` writes its standalone merged checkpoint into `out` and
    returns the settings it was built from, or is `None` with `no_export` saying why.
    `card_metrics` and `figures` are keyed by recipe name. `plan_parts(lm, vision, diffusion,
    model, data)`, for `mmpeft plan`, gives what a config's run holds besides a LLaVA-style
    model: `(mmpeft.train.plan_parts.RecipeParts, the vision tower's sizes on the GPU, the
    connector's parameters)`; None plans the LLaVA-style model alone."""

    name: str
    recipes: tuple[str, ...]  # the `recipe` its runs record in mmpeft_config.json
    description: str  # completes "This is ...", for model cards
    pipeline_tag: str
    load: Callable[..., Loaded]
    export: Callable[..., dict] | None = None
    no_export: str = ""
    card_metrics: dict[str, tuple[CardMetric, ...]] = field(default_factory=dict)
    figures: dict[str, Callable[[str, dict], list[FigureRow]]] = field(default_factory=dict)
    plan_parts: Callable[..., tuple] | None = None


def families() -> dict[str, Family]:
    """Every registered family by name."""
    found = {}
    for package in FAMILY_PACKAGES:
        family = importlib.import_module(package).FAMILY
        found[family.name] = family
    return found


def family_of(recipe: str, where: str | Path = "mmpeft_config.json") -> Family:
    """The family whose runs record `recipe`; an error naming `where` and the known recipes
    otherwise."""
    registered = families().values()
    for family in registered:
        if recipe in family.recipes:
            return family
    known = sorted(r for f in registered for r in f.recipes)
    raise ValueError(f"{where}: field 'recipe' is {recipe!r}, not one of {', '.join(known)}")
