"""Write the tiny world to disk in the formats real users have.

Layout under the world root (see the README for what each recipe reads):

    coco/{split}/{image_id:012d}.jpg           images
    coco/annotations/captions_{split}.json     COCO captions, five per image
    coco/annotations/instances_{split}.json    COCO boxes, pixel [x, y, w, h]
    llava/{split}.json                         LLaVA instruction records, images under coco/
    eval/{split}_qa.jsonl                      one checkable question per line, for accuracy
    wds/{split}/{shard:05d}.tar                caption pairs as img2dataset writes them
    vist/images/{split}/{photo_flickr_id}.jpg  story images
    vist/sis/{split}.story-in-sequence.json    VIST stories, five steps each
    lm/{split}.jsonl                           text for the tiny LM: captions, stories, chats
    world.json                                 what was built, written last

The same arguments give byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from mmpeft.tiny.world.scene import SHAPES, Thing, box, captions, qa_pairs, render, sample_scene, text_description
from mmpeft.tiny.world.story import sample_story

WORLD_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class WorldSpec:
    """Everything a world build depends on; two equal specs give identical files."""

    seed: int = 0
    images: tuple[int, int, int] = (4000, 300, 500)
    stories: tuple[int, int, int] = (600, 50, 100)
    image_size: int = 64
    shard_size: int = 1000
    text_only_fraction: float = 0.05
    version: int = WORLD_VERSION


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def _coco_annotations(image_id: int, scene: list[Thing], size: int) -> list[dict]:
    anns = []
    for k, thing in enumerate(scene):
        x1, y1, x2, y2 = box(thing, size)
        w, h = x2 - x1, y2 - y1
        area = {"circle": 3.14159265 / 4, "square": 1.0, "triangle": 0.5}[thing.shape] * w * h
        anns.append({
            "id": image_id * 10 + k, "image_id": image_id,
            "category_id": SHAPES.index(thing.shape) + 1,
            "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)],
            "area": round(area, 2), "iscrowd": 0,
            "attributes": {"colour": thing.colour, "size": thing.size},
        })
    return anns


def scene_chats(n: int, rng: random.Random, questions_per_chat: int = 3) -> list[dict]:
    """`n` text-only chats (rows of `lm/*.jsonl`) about fresh scenes: a description, then up
    to `questions_per_chat` questions about it. More of them teach a tiny LM to answer from
    its context."""
    rows = []
    for _ in range(n):
        scene = sample_scene(rng)
        questions = qa_pairs(scene, rng)
        rng.shuffle(questions)
        rows.append(_chat_row(questions[:questions_per_chat], scene, rng))
    return rows


def _chat_row(questions: list[dict], scene, rng: random.Random) -> dict:
    """A text-only chat (a row of `lm/*.jsonl`): the scene's description, then `questions`."""
    chat = _conversation(questions, text_description(scene), rng, False)
    return {"messages": [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                         for t in chat], "type": questions[0]["type"], "options": questions[0]["options"]}


def _conversation(pairs: list[dict], first_prefix: str, rng: random.Random, image: bool) -> list[dict]:
    turns = []
    for k, p in enumerate(pairs):
        question = p["q"]
        if k == 0:
            if image:
                question = f"{IMAGE_MARKER}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_MARKER}"
            else:
                question = f"{first_prefix} {question}"
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": p["a"].capitalize() + "."})
    return turns


def _write_split(root: Path, spec: WorldSpec, split: str, first_id: int, rng: random.Random) -> int:
    n_images = spec.images[SPLITS.index(split)]
    size = spec.image_size
    coco_images, coco_anns, coco_caps, llava, qa, lm_rows, pairs_for_wds = [], [], [], [], [], [], []
    for k in range(n_images):
        image_id = first_id + k
        scene = sample_scene(rng)
        file_name = f"{image_id:012d}.jpg"
        data = _jpeg(render(scene, size))
        (root / "coco" / split).mkdir(parents=True, exist_ok=True)
        (root / "coco" / split / file_name).write_bytes(data)
        coco_images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        coco_anns.extend(_coco_annotations(image_id, scene, size))
        caps = captions(scene, rng)
        for j, cap in enumerate(caps):
            coco_caps.append({"id": image_id * 10 + j, "image_id": image_id, "caption": cap})
        pairs_for_wds.append((data, caps[0], image_id))
        questions = qa_pairs(scene, rng)
        rng.shuffle(questions)
        qa.append({**questions[0], "id": f"{split}-{image_id}", "image": f"{split}/{file_name}"})
        text_only = rng.random() < spec.text_only_fraction
        turns = questions[: rng.randint(1, 3)]
        record = {"id": f"{split}-{image_id}",
                  "conversations": _conversation(turns, text_description(scene), rng, not text_only)}
        if not text_only:
            record["image"] = f"{split}/{file_name}"
        if not text_only and rng.random() < 0.2:
            record["conversations"] += [{"from": "human", "value": "Describe the image briefly."},
                                        {"from": "gpt", "value": caps[0]}]
        llava.append(record)
        lm_rows.append({"text": caps[rng.randrange(5)]})
        lm_rows.append(_chat_row(questions[:3], scene, rng))
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    ann_dir = root / "coco" / "annotations"
    info = {"description": "mmpeft tiny world", "version": str(spec.version)}
    _write_json(ann_dir / f"instances_{split}.json",
                {"info": info, "images": coco_images, "annotations": coco_anns, "categories": categories})
    _write_json(ann_dir / f"captions_{split}.json",
                {"info": info, "images": coco_images, "annotations": coco_caps})
    _write_json(root / "llava" / f"{split}.json", llava)
    _write_jsonl(root / "eval" / f"{split}_qa.jsonl", qa)
    _write_wds(root / "wds" / split, pairs_for_wds, spec)
    story_rows = _write_vist(root, spec, split, first_id + n_images, rng)
    _write_jsonl(root / "lm" / f"{split}.jsonl", lm_rows + story_rows)
    return first_id + n_images + spec.stories[SPLITS.index(split)] * 5


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_wds(out: Path, pairs: list[tuple[bytes, str, int]], spec: WorldSpec) -> None:
    """Shards named and filled the way img2dataset writes them: key = shard (5 digits)
    + index in shard (4 digits), with key.jpg, key.txt and key.json, plus a stats file."""
    out.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(pairs), spec.shard_size)):
        chunk = pairs[start:start + spec.shard_size]
        with tarfile.open(out / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for k, (data, caption, image_id) in enumerate(chunk):
                key = f"{shard:05d}{k:04d}"
                meta = {"key": key, "caption": caption, "status": "success", "error_message": None,
                        "url": f"coco/{image_id:012d}.jpg", "width": spec.image_size,
                        "height": spec.image_size, "original_width": spec.image_size,
                        "original_height": spec.image_size}
                _tar_add(tar, f"{key}.jpg", data)
                _tar_add(tar, f"{key}.txt", caption.encode())
                _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        _write_json(out / f"{shard:05d}_stats.json",
                    {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0})


def _write_vist(root: Path, spec: WorldSpec, split: str, first_photo: int, rng: random.Random) -> list[dict]:
    image_dir = root / "vist" / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, lm_rows = [], [], []
    photo = first_photo
    for s in range(spec.stories[SPLITS.index(split)]):
        story_id = f"{split}-{s}"
        sentences = []
        for order, (scene, sentence) in enumerate(sample_story(rng)):
            (image_dir / f"{photo}.jpg").write_bytes(_jpeg(render(scene, spec.image_size)))
            images.append({"id": str(photo), "album_id": story_id, "title": "tiny world"})
            annotations.append([{
                "story_id": story_id, "storylet_id": f"{story_id}-{order}", "album_id": story_id,
                "photo_flickr_id": str(photo), "worker_arranged_photo_order": order,
                "text": sentence.lower(), "original_text": sentence, "tier": "story-in-sequence",
                "scene": [asdict(t) for t in scene],
            }])
            sentences.append(sentence)
            photo += 1
        lm_rows.append({"text": " ".join(sentences)})
    _write_json(root / "vist" / "sis" / f"{split}.story-in-sequence.json",
                {"images": images, "annotations": annotations})
    return lm_rows


def build_world(root: str | os.PathLike, spec: WorldSpec = WorldSpec()) -> Path:
    """Build the world into `root` unless an identical build is already there.

    Writes into a temporary sibling folder and renames it into place at the end, so an
    interrupted build never leaves a half world that looks finished.
    """
    root = Path(root)
    manifest = root / "world.json"
    wanted = asdict(spec)
    wanted["images"], wanted["stories"] = list(spec.images), list(spec.stories)
    if manifest.exists():
        if json.loads(manifest.read_text()) == wanted:
            return root
        raise FileExistsError(f"{root} holds a different world ({manifest}); remove it or pick another folder")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no world.json; remove it or pick another folder")
    tmp = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    next_id = 1
    for split in SPLITS:
        next_id = _write_split(tmp, spec, split, next_id, random.Random(f"mmpeft-world-{spec.seed}-{split}"))
    _write_json(tmp / "world.json", wanted)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return root
