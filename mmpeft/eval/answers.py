"""Text answers scored: checkable questions (the world's `eval/{split}_qa.jsonl`), how two
answers compare, and word F1 between a generated text and a reference."""

from __future__ import annotations

import json
import re
from pathlib import Path


def normalise_answer(text: str) -> str:
    """Lower case, without surrounding spaces and final punctuation: how answers compare."""
    return text.strip().strip(".!?").strip().lower()


def read_questions(path: str | Path, image_folder: str | Path, limit: int | None = None) -> list[dict]:
    """Rows `{id, image, q, a, type, options}` with the image path made absolute."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for row in rows:
        row["image"] = Path(image_folder) / row["image"]
    return rows[:limit] if limit else rows


def swapped_images(rows: list[dict]) -> list[dict]:
    """The image-swap control: the same questions, each about another test image (every
    image replaced by the next distinct one, the last by the first). What a model still gets
    right then comes from the questions alone (the answers' priors); the gap to its accuracy
    on the right images is what the image carries."""
    images = list(dict.fromkeys(str(r["image"]) for r in rows))
    if len(images) < 2:
        raise ValueError("the image-swap control needs questions about at least two images")
    other = {im: images[(k + 1) % len(images)] for k, im in enumerate(images)}
    return [{**r, "image": type(r["image"])(other[str(r["image"])])} for r in rows]


def image_control(after: dict, swapped: dict) -> tuple[dict, str]:
    """The metrics and the report line of `answer_accuracy` on `swapped_images` beside the
    accuracy on the right images: overall and by question type, and the gap."""
    gap = after["accuracy"] - swapped["accuracy"]
    metrics = {"answer_accuracy_image_swapped": swapped["accuracy"], "by_type_image_swapped": swapped["by_type"],
               "image_gap": gap}
    text = (f"with each image swapped for another {swapped['accuracy']:.3f} (the image carries {gap:+.3f}); by type "
            + ", ".join(f"{k} {after['by_type'][k]:.2f} vs {v:.2f}" for k, v in swapped["by_type"].items()))
    return metrics, text


def before_and_after(before: dict | None, after: dict) -> tuple[dict, str]:
    """The metrics of `answer_accuracy` run before and after training, and the line that
    reports them. `before` None: not measured (the value is null, the line says so)."""
    metrics = {"answer_accuracy_before": before["accuracy"] if before else None,
               "answer_accuracy_after": after["accuracy"], "chance": after["chance"], "by_type_after": after["by_type"]}
    shown = f"{before['accuracy']:.3f}" if before else "not measured"
    text = (f"answer accuracy on {after['questions']} held-out questions: {shown} before, "
            f"{after['accuracy']:.3f} after (chance {after['chance']:.3f}); by type "
            + ", ".join(f"{k} {v:.2f}" for k, v in after["by_type"].items()))
    return metrics, text


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def word_f1(a: str, b: str) -> float:
    x, y = _words(a), _words(b)
    common = sum(min(x.count(w), y.count(w)) for w in set(x))
    return 0.0 if not common else 2 * common / (len(x) + len(y))
