"""What the teacher LLM is shown about each image: its captions and its object boxes.

Boxes become `category: [x1, y1, x2, y2]` with coordinates as fractions of the image
side, rounded to 3 decimals, as LLaVA's prompts show them. An image that cannot be
described honestly (no captions, an unknown category, a malformed box, a line that is not
JSON) is a bad record: with `skip_bad_records` it is left out and counted by reason in the
`ReadReport`; without, the first one stops the reading with a `BadInput` that names the
file, the record and the reason, before any context is returned.
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


class BadInput(ValueError):
    """An input record that cannot be described; the message names its file and the record."""

    def __init__(self, source, record_id: str, reason: str, kind: str):
        super().__init__(f"{source}: {record_id}: {reason}")
        self.record_id, self.reason, self.kind = record_id, reason, kind


@dataclass
class ReadReport:
    """Skipped images by reason (with a few ids each) and other counted adjustments."""

    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)

    def bad(self, kind: str, image_id, skip_bad_records: bool, source, record_id: str, reason: str) -> None:
        """A bad record: counted under `kind` (shown by `image_id`) with `skip_bad_records`,
        else a `BadInput` naming `source`, `record_id` and `reason`."""
        if not skip_bad_records:
            raise BadInput(source, record_id, reason, kind)
        self.skip(kind, image_id)

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
                       max_boxes: int = 20, crowd: str = "drop", *,
                       skip_bad_records: bool = False) -> tuple[list[ImageContext], ReadReport]:
    """Contexts from raw COCO `captions_*.json` (+ `instances_*.json`), in image-id order.

    Captions are taken in annotation-id order, the first `max_captions` when there are
    more. Crowd boxes (one box around a group) are dropped (`crowd="drop"`, counted) or
    kept as `category (group)` (`crowd="keep"`). At most `max_boxes` boxes, the largest.
    An image without captions, or with an annotation of an unknown category or a malformed
    box, is a bad record (see the module's docstring for `skip_bad_records`).
    """
    if crowd not in ("drop", "keep"):
        raise ValueError(f"crowd must be 'drop' or 'keep', not {crowd!r}")
    report = ReadReport()
    caps = _read_json(captions_file)
    images = {img["id"]: img for img in caps.get("images", [])}
    captions: dict = {}
    for ann in sorted(caps.get("annotations", []), key=lambda a: a.get("id", 0)):
        if isinstance(ann.get("caption"), str) and ann["caption"].strip():
            captions.setdefault(ann.get("image_id"), []).append(" ".join(ann["caption"].split()))
    boxes: dict = {}
    bad: set = set()
    if instances_file:
        inst = _read_json(instances_file)
        names = {c["id"]: c["name"] for c in inst.get("categories", [])}
        for img in inst.get("images", []):
            images.setdefault(img["id"], img)
        for ann in sorted(inst.get("annotations", []), key=lambda a: a.get("id", 0)):
            image_id = ann.get("image_id")
            img = images.get(image_id)
            if image_id in bad or img is None:  # an image no file lists has nothing to describe
                continue
            where = f"annotation {ann.get('id', '?')} (image {image_id})"
            if ann.get("category_id") not in names:
                report.bad("unknown category", image_id, skip_bad_records, instances_file, where,
                           f"unknown category id {ann.get('category_id')}")
                bad.add(image_id)
                continue
            try:
                box = normalise_box(ann.get("bbox"), img["width"], img["height"])
            except ValueError as err:
                report.bad("malformed box", image_id, skip_bad_records, instances_file, where, str(err))
                bad.add(image_id)
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
            continue
        if not captions.get(image_id):
            report.bad("no captions", image_id, skip_bad_records, captions_file, f"image {image_id}", "no captions")
            continue
        chosen = captions[image_id][:max_captions]
        if len(captions[image_id]) > max_captions:
            report.notes[f"more than {max_captions} captions, the first {max_captions} by annotation id used"] += 1
        contexts.append(ImageContext(str(image_id), images[image_id]["file_name"], chosen,
                                     _cap_boxes(boxes.get(image_id, []), max_boxes, report)))
    return contexts, report


def _read_json(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read COCO annotations: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO object with 'images' and 'annotations'")
    return data


def read_jsonl_contexts(path: str | Path, max_captions: int = 5, max_boxes: int = 20, *,
                        skip_bad_records: bool = False) -> tuple[list[ImageContext], ReadReport]:
    """Contexts from JSONL lines `{"image", "captions": [...], "boxes": [{"category",
    "bbox": [x1, y1, x2, y2] in [0, 1]}]}`. A line that is not a JSON object, or has no
    image, no captions or a malformed box, is a bad record named by its line (see the
    module's docstring for `skip_bad_records`)."""
    report = ReadReport()
    contexts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            report.bad("not JSON", where, skip_bad_records, path, where, f"not JSON ({err})")
            continue
        if not isinstance(row, dict):
            report.bad("not JSON", where, skip_bad_records, path, where, "not a JSON object")
            continue
        if not isinstance(row.get("image"), str):
            report.bad("no image", where, skip_bad_records, path, where, "no 'image' path")
            continue
        given = row.get("captions")
        caps = [" ".join(c.split()) for c in given if isinstance(c, str) and c.strip()] \
            if isinstance(given, list) else []
        if not caps:
            report.bad("no captions", where, skip_bad_records, path, where, "no captions")
            continue
        boxes = row.get("boxes") or []
        parsed = [_jsonl_box(b) for b in boxes] if isinstance(boxes, list) else [None]
        if None in parsed:
            bad = boxes[parsed.index(None)] if isinstance(boxes, list) else boxes
            report.bad("malformed box", where, skip_bad_records, path, where,
                       f"box {bad!r} is not {{category, bbox: [x1, y1, x2, y2] in [0, 1], x1 < x2, y1 < y2}}")
            continue
        contexts.append(ImageContext(str(row.get("id", n)), row["image"], caps[:max_captions],
                                     _cap_boxes(parsed, max_boxes, report)))
    return contexts, report


def _jsonl_box(b) -> tuple[str, list[float]] | None:
    """`(category, box rounded to 3 decimals)` of a JSONL box, None when it is malformed."""
    box = b.get("bbox") if isinstance(b, dict) else None
    if not (isinstance(b, dict) and isinstance(b.get("category"), str) and isinstance(box, list)
            and len(box) == 4 and all(isinstance(v, int | float) and 0 <= v <= 1 for v in box)
            and box[0] < box[2] and box[1] < box[3]):
        return None
    return b["category"], [round(float(v), 3) for v in box]
