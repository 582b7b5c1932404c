"""Readers of the formats users have, each record becoming a `Sample` (or a bad sample that
says what is wrong with it): LLaVA JSON, a Hugging Face dataset with `messages` + `images`
columns, img2dataset caption shards, and a JSONL of image + caption. The large ones are read
a record at a time (`iter_llava_json`, `iter_messages_dataset`) or in place (shards)."""

from __future__ import annotations

import glob
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from mmpeft.data.conversation import ROLES, Sample, bad_sample
from mmpeft.data.json_stream import iter_json_array
from mmpeft.data.shards import IMAGE_EXTENSIONS, index_shard
from mmpeft.data.templates import IMAGE_MARKER


def read_llava_json(path: str | Path, image_folder: str | Path) -> list[Sample]:
    """LLaVA's `[{"id", "image"?, "conversations": [{"from", "value"}]}]` with image paths
    relative to `image_folder`. Structural errors name the file and the record."""
    return list(iter_llava_json(path, image_folder))


def iter_llava_json(path: str | Path, image_folder: str | Path) -> Iterator[Sample]:
    """`read_llava_json`'s samples one at a time, the file read as they are taken."""
    for k, record in enumerate(iter_json_array(path, "LLaVA records")):
        yield llava_sample(record, k, Path(image_folder))


def llava_sample(record, k: int, image_folder: Path) -> Sample:
    """The sample of the `k`-th LLaVA record, or a bad sample saying what is wrong with it."""
    if not isinstance(record, dict):
        return bad_sample(f"#{k}", f"a record must be an object, not {type(record).__name__}", "malformed")
    rid = str(record.get("id", f"#{k}"))
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
        return bad_sample(rid, "'conversations' must be a list of {from, value}", "malformed")
    unknown = {t["from"] for t in turns} - set(ROLES)
    if unknown:
        return bad_sample(rid, f"unknown speaker(s) {sorted(unknown)}", "unknown speaker")
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    return Sample(rid, [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns],
                  [image_folder / im for im in images])


def read_messages_dataset(dataset, id_column: str | None = None) -> list[Sample]:
    """A Hugging Face dataset (or list of dicts) with `messages` and `images` columns, as
    TRL's vision SFT uses: content is text, or a list of `{"type": "image"}` and
    `{"type": "text", "text": ...}` parts. A row with an unknown role or malformed messages
    is a bad record (`Sample.problem`) named by `id_column` or its row number."""
    return list(iter_messages_dataset(dataset, id_column))


def iter_messages_dataset(dataset, id_column: str | None = None) -> Iterator[Sample]:
    """`read_messages_dataset`'s samples one at a time, each row's images encoded only when
    its sample is taken."""
    for k, row in enumerate(dataset):
        rid = str(row[id_column]) if id_column else f"#{k}"
        turns = row.get("messages")
        if not isinstance(turns, list) or not all(_is_message(m) for m in turns):
            yield bad_sample(rid, "'messages' must be a list of {role, content}", "malformed")
            continue
        unknown = {m["role"] for m in turns} - set(ROLES)
        if unknown:
            yield bad_sample(rid, f"unknown role(s) {sorted(unknown)}", "unknown speaker")
            continue
        messages = [{"role": ROLES[m["role"]], "content": _content_text(m["content"])} for m in turns]
        images = [im if isinstance(im, str | Path | bytes) else _to_bytes(im) for im in row.get("images") or []]
        yield Sample(rid, messages, images)


def _is_message(m) -> bool:
    content = m.get("content") if isinstance(m, dict) and "role" in m else None
    return isinstance(content, str) or isinstance(content, list) and all(isinstance(p, dict) for p in content)


def _content_text(content: str | list) -> str:
    """A message's content as text: parts joined, each image part an `<image>` marker."""
    if isinstance(content, str):
        return content
    return "".join(IMAGE_MARKER if part.get("type") == "image" else part.get("text") or "" for part in content)


def _to_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def caption_sample(sample_id: str, image, caption: str) -> Sample:
    """A stage-1 pair: the user turn is only the image, the answer is the caption."""
    return Sample(sample_id, [{"role": "user", "content": IMAGE_MARKER},
                              {"role": "assistant", "content": caption.strip()}], [image])


def read_caption_shards(pattern: str) -> list[Sample]:
    """Caption pairs from img2dataset webdataset shards (`key.jpg` + `key.txt`), images held
    as `ShardMember`s (`index_shard`). A key with an image but no caption, or the reverse, is
    a bad record (`Sample.problem`) named by shard and key; so is a shard that is compressed,
    cut short or not a tar, named by its file."""
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise FileNotFoundError(f"no shards match {pattern}")
    samples = []
    for shard in shards:
        try:
            members = index_shard(shard)
        except (OSError, tarfile.TarError) as err:
            samples.append(bad_sample(Path(shard).name, f"unreadable shard {shard}: {err}; none of its records "
                                      "are used", "unreadable shard"))
            continue
        for key, parts in members.items():
            image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
            rid = f"{Path(shard).name}/{key}"
            if image is None or "txt" not in parts:
                samples.append(bad_sample(rid, "no image" if image is None else "no caption (.txt)",
                                          "no image" if image is None else "no caption"))
                continue
            try:
                samples.append(caption_sample(rid, image, parts["txt"].decode()))
            except UnicodeDecodeError:
                samples.append(bad_sample(rid, "the caption (.txt) is not UTF-8 text", "malformed"))
    return samples


def read_caption_jsonl(path: str | Path, image_folder: str | Path) -> list[Sample]:
    """Caption pairs from JSONL lines `{"image": relative path, "caption": text}`; a line that
    is not a JSON object with both is a bad record (`Sample.problem`) named by its line."""
    samples = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            samples.append(bad_sample(f"line{n}", f"line {n} of {path} is not JSON ({err})", "not JSON"))
            continue
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            rid = str(row.get("id", f"line{n}")) if isinstance(row, dict) else f"line{n}"
            samples.append(bad_sample(rid, f"line {n} needs 'image' and 'caption'", "malformed"))
            continue
        samples.append(caption_sample(str(row.get("id", f"line{n}")), Path(image_folder) / row["image"],
                                      row["caption"]))
    return samples
