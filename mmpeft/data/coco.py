"""COCO captions and instances files, read with checks that name the file and record."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CocoImage:
    """One image with its captions and its objects (`category name`, pixel `[x, y, w, h]`,
    crowd flag, and any extra attributes the annotation carries)."""

    image_id: int
    path: Path
    width: int
    height: int
    captions: list[str] = field(default_factory=list)
    objects: list[dict] = field(default_factory=list)


def _load(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read COCO annotations: {err}") from err
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: field '{key}' is missing or not a list")
    return data


def read_coco(image_dir: str | Path, captions_file: str | Path | None = None,
              instances_file: str | Path | None = None) -> list[CocoImage]:
    """Images from one or both COCO files, in image-id order.

    A record whose `image_id` names no image, or that lacks a required field, raises an
    error naming the file and the annotation id.
    """
    image_dir = Path(image_dir)
    images: dict[int, CocoImage] = {}
    sources = [(f, kind) for f, kind in ((captions_file, "captions"), (instances_file, "instances")) if f]
    if not sources:
        raise ValueError("read_coco needs a captions file, an instances file, or both")
    for path, kind in sources:
        data = _load(Path(path))
        for img in data["images"]:
            try:
                images.setdefault(img["id"], CocoImage(img["id"], image_dir / img["file_name"],
                                                       img["width"], img["height"]))
            except KeyError as err:
                raise ValueError(f"{path}: image record {img.get('id', '?')} lacks field {err}") from err
        names = {c["id"]: c["name"] for c in data.get("categories", [])}
        for ann in data["annotations"]:
            where = f"{path}: annotation {ann.get('id', '?')}"
            if ann.get("image_id") not in images:
                raise ValueError(f"{where}: image_id {ann.get('image_id')} is not among the file's images")
            target = images[ann["image_id"]]
            if kind == "captions":
                if not isinstance(ann.get("caption"), str):
                    raise ValueError(f"{where}: field 'caption' is missing or not text")
                target.captions.append(ann["caption"].strip())
            else:
                if ann.get("category_id") not in names:
                    raise ValueError(f"{where}: category_id {ann.get('category_id')} is not in 'categories'")
                target.objects.append({"category": names[ann["category_id"]], "bbox": ann.get("bbox"),
                                       "iscrowd": ann.get("iscrowd", 0), **ann.get("attributes", {})})
    return [images[k] for k in sorted(images)]
