"""What the teacher LLM is shown about each image: its captions and its object boxes.

Boxes become `category: [x1, y1, x2, y2]` with coordinates as fractions of the image
side, rounded to 3 decimals, as LLaVA's prompts show them. Images that cannot be
described honestly (no captions, an unknown category, a malformed box) are skipped and
counted by reason; reading never stops halfway through a file.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ImageContext:
    """One image: `image` is its path relative to the image folder."""

    image_id: str
    image: str
    captions: list[str]
    boxes: list[tuple[str, list[float]]] = field(default_factory=list)

    def render(self, with_boxes: bool) -> str:
        text = "\n".join(self.captions)
        if with_boxes and self.boxes:
            text += "\n\n" + "\n".join(f"{name}: [{', '.join(f'{v:.3f}' for v in box)}]" for name, box in self.boxes)
        return text

    def counts(self) -> Counter:
        return Counter(name for name, _ in self.boxes)


@dataclass
class ReadReport:
    """Skipped images by reason (with a few ids each) and other counted adjustments."""

    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)

    def skip(self, reason: str, image_id) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(str(image_id))

    def lines(self) -> list[str]:
        out = [f"skipped {n} image(s): {reason} (e.g. {', '.join(self.examples[reason])})"
               for reason, n in sorted(self.skipped.items())]
        return out + [f"{n} image(s): {note}" for note, n in sorted(self.notes.items())]


def normalise_box(bbox, width: float, height: float) -> list[float]:
    """COCO's pixel `[x, y, w, h]` as `[x1, y1, x2, y2]` fractions of the image, rounded to
    3 decimals. Raises ValueError for a box that is not 4 finite numbers with positive size
    inside the image (a pixel of slack for rounding)."""
    if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in bbox):
        raise ValueError(f"box {bbox!r} is not four numbers")
    x, y, w, h = bbox
    if w <= 0 or h <= 0 or x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        raise ValueError(f"box {list(bbox)} is empty or outside the {width}x{height} image")
    clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
    return [round(clip(x / width), 3), round(clip(y / height), 3), round(clip((x + w) / width), 3),
            round(clip((y + h) / height), 3)]


def _cap_boxes(boxes: list[tuple[str, list[float]]], max_boxes: int, report: ReadReport) -> list:
    if len(boxes) <= max_boxes:
        return boxes
    report.notes[f"more than {max_boxes} boxes, the largest {max_boxes} kept"] += 1
    area = lambda b: (b[1][2] - b[1][0]) * (b[1][3] - b[1][1])  # noqa: E731
    keep = sorted(sorted(range(len(boxes)), key=lambda i: -area(boxes[i]))[:max_boxes])
    return [boxes[i] for i in keep]


def read_coco_contexts(captions_file: str | Path, instances_file: str | Path | None, max_captions: int = 5,
                       max_boxes: int = 20, crowd: str = "drop") -> tuple[list[ImageContext], ReadReport]:
    """Contexts from raw COCO `captions_*.json` (+ `instances_*.json`), in image-id order.

    Captions are taken in annotation-id order, the first `max_captions` when there are
    more. Crowd boxes (one box around a group) are dropped (`crowd="drop"`, counted) or
    kept as `category (group)` (`crowd="keep"`). At most `max_boxes` boxes, the largest.
    """
    if crowd not in ("drop", "keep"):
        raise ValueError(f"crowd must be 'drop' or 'keep', not {crowd!r}")
    report = ReadReport()
    caps = json.loads(Path(captions_file).read_text())
    images = {img["id"]: img for img in caps.get("images", [])}
    captions: dict = {}
    for ann in sorted(caps.get("annotations", []), key=lambda a: a.get("id", 0)):
        if isinstance(ann.get("caption"), str) and ann["caption"].strip():
            captions.setdefault(ann.get("image_id"), []).append(" ".join(ann["caption"].split()))
    boxes: dict = {}
    bad: dict = {}
    if instances_file:
        inst = json.loads(Path(instances_file).read_text())
        names = {c["id"]: c["name"] for c in inst.get("categories", [])}
        for img in inst.get("images", []):
            images.setdefault(img["id"], img)
        for ann in sorted(inst.get("annotations", []), key=lambda a: a.get("id", 0)):
            image_id = ann.get("image_id")
            if image_id in bad:
                continue
            if ann.get("category_id") not in names:
                bad[image_id] = f"unknown category id {ann.get('category_id')}"
                continue
            img = images.get(image_id)
            if img is None:
                continue
            try:
                box = normalise_box(ann.get("bbox"), img["width"], img["height"])
            except ValueError:
                bad[image_id] = "malformed box"
                continue
            name = names[ann["category_id"]]
            if ann.get("iscrowd"):
                if crowd == "drop":
                    report.notes["crowd box dropped"] += 1
                    continue
                name += " (group)"
            boxes.setdefault(image_id, []).append((name, box))
    contexts = []
    for image_id in sorted(images):
        if image_id in bad:
            report.skip(bad[image_id].split(" id ")[0], image_id)
            continue
        if not captions.get(image_id):
            report.skip("no captions", image_id)
            continue
        chosen = captions[image_id][:max_captions]
        if len(captions[image_id]) > max_captions:
            report.notes[f"more than {max_captions} captions, the first {max_captions} by annotation id used"] += 1
        contexts.append(ImageContext(str(image_id), images[image_id]["file_name"], chosen,
                                     _cap_boxes(boxes.get(image_id, []), max_boxes, report)))
    return contexts, report


def read_jsonl_contexts(path: str | Path, max_captions: int = 5,
                        max_boxes: int = 20) -> tuple[list[ImageContext], ReadReport]:
    """Contexts from JSONL lines `{"image", "captions": [...], "boxes": [{"category",
    "bbox": [x1, y1, x2, y2] in [0, 1]}]}`; a bad line is skipped with its reason."""
    report = ReadReport()
    contexts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            report.skip("not JSON", where)
            continue
        if not isinstance(row.get("image"), str):
            report.skip("no image", where)
            continue
        caps = [" ".join(c.split()) for c in row.get("captions") or [] if isinstance(c, str) and c.strip()]
        if not caps:
            report.skip("no captions", where)
            continue
        parsed, ok = [], True
        for b in row.get("boxes") or []:
            box = b.get("bbox") if isinstance(b, dict) else None
            if not (isinstance(b, dict) and isinstance(b.get("category"), str) and isinstance(box, list)
                    and len(box) == 4 and all(isinstance(v, int | float) and 0 <= v <= 1 for v in box)
                    and box[0] < box[2] and box[1] < box[3]):
                ok = False
                break
            parsed.append((b["category"], [round(float(v), 3) for v in box]))
        if not ok:
            report.skip("malformed box", where)
            continue
        contexts.append(ImageContext(str(row.get("id", n)), row["image"], caps[:max_captions],
                                     _cap_boxes(parsed, max_boxes, report)))
    return contexts, report
