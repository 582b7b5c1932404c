"""Multimodal conversations: reading them from the formats users have, and turning each
into model inputs whose labels cover the assistant's answers and nothing else.

A `Sample` is one conversation: `messages` (user / assistant turns, `<image>` where an
image goes) and the images they refer to. Readers build samples from LLaVA JSON, a
Hugging Face dataset with `messages` + `images` columns, img2dataset caption shards, or a
JSONL of image + caption.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from mmpeft.data.templates import IMAGE_MARKER, SeparatorFormat

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadRecord(ValueError):
    """A record that cannot become a training sample; the message names it (and its file,
    `source`, when known) and says why."""

    def __init__(self, record_id: str, reason: str, kind: str, source: str | None = None):
        super().__init__(f"{source + ': ' if source else ''}record {record_id}: {reason}")
        self.record_id, self.reason, self.kind = record_id, reason, kind


@dataclass
class Sample:
    """One conversation with the images its `<image>` markers refer to, in order. An image
    is a path or raw bytes. `problem`: `(reason, kind)` when a reader found the record bad;
    the dataset then stops on it, or with `skip_bad_records` leaves it out and counts it."""

    id: str
    messages: list[dict]
    images: list = field(default_factory=list)
    problem: tuple[str, str] | None = None


def bad_sample(record_id: str, reason: str, kind: str) -> Sample:
    """A record a reader could not read (`Sample.problem`), kept for the dataset to judge."""
    return Sample(record_id, [], problem=(reason, kind))


def read_llava_json(path: str | Path, image_folder: str | Path) -> list[Sample]:
    """LLaVA's `[{"id", "image"?, "conversations": [{"from", "value"}]}]` with image paths
    relative to `image_folder`. Structural errors name the file and the record."""
    path, image_folder = Path(path), Path(image_folder)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read LLaVA records: {err}") from err
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of records, found {type(records).__name__}")
    samples = []
    for k, rec in enumerate(records):
        rid = str(rec.get("id", f"#{k}"))
        turns = rec.get("conversations")
        if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t
                                                  for t in turns):
            samples.append(bad_sample(rid, "'conversations' must be a list of {from, value}", "malformed"))
            continue
        unknown = {t["from"] for t in turns} - set(ROLES)
        if unknown:
            samples.append(bad_sample(rid, f"unknown speaker(s) {sorted(unknown)}", "unknown speaker"))
            continue
        images = rec.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        samples.append(Sample(rid, [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns],
                              [image_folder / im for im in images]))
    return samples


def read_messages_dataset(dataset, id_column: str | None = None) -> list[Sample]:
    """A Hugging Face dataset (or list of dicts) with `messages` and `images` columns, as
    TRL's vision SFT uses: content is text, or a list of `{"type": "image"}` and
    `{"type": "text", "text": ...}` parts."""
    samples = []
    for k, row in enumerate(dataset):
        messages = []
        for m in row["messages"]:
            content = m["content"]
            if isinstance(content, list):
                content = "".join(IMAGE_MARKER if part.get("type") == "image" else part.get("text", "")
                                  for part in content)
            if m["role"] not in ROLES:
                raise ValueError(f"dataset row {row[id_column] if id_column else k}: unknown role {m['role']!r}")
            messages.append({"role": ROLES[m["role"]], "content": content})
        images = [im if isinstance(im, str | Path | bytes) else _to_bytes(im) for im in row.get("images") or []]
        samples.append(Sample(str(row[id_column]) if id_column else f"#{k}", messages, images))
    return samples


def _to_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def caption_sample(sample_id: str, image, caption: str) -> Sample:
    """A stage-1 pair: the user turn is only the image, the answer is the caption."""
    return Sample(sample_id, [{"role": "user", "content": IMAGE_MARKER},
                              {"role": "assistant", "content": caption.strip()}], [image])


def read_caption_shards(pattern: str) -> list[Sample]:
    """Caption pairs from img2dataset webdataset shards (`key.jpg` + `key.txt`); a key with
    an image but no caption, or the reverse, is a bad record (`Sample.problem`) named by
    shard and key."""
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise FileNotFoundError(f"no shards match {pattern}")
    samples = []
    for shard in shards:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                if info.isfile():
                    key, _, ext = info.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for key, parts in members.items():
            image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            rid = f"{Path(shard).name}/{key}"
            if image is None or "txt" not in parts:
                samples.append(bad_sample(rid, "no image" if image is None else "no caption (.txt)",
                                          "no image" if image is None else "no caption"))
                continue
            samples.append(caption_sample(rid, image, parts["txt"].decode()))
    return samples


def read_caption_jsonl(path: str | Path, image_folder: str | Path) -> list[Sample]:
    """Caption pairs from JSONL lines `{"image": relative path, "caption": text}`."""
    samples = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "image" not in row or "caption" not in row:
            samples.append(bad_sample(str(row.get("id", f"line{n}")), f"line {n} needs 'image' and 'caption'",
                                      "malformed"))
            continue
        samples.append(caption_sample(str(row.get("id", f"line{n}")), Path(image_folder) / row["image"],
                                      row["caption"]))
    return samples


def open_image(image, record_id: str) -> Image.Image:
    """Decode an image path or bytes to RGB; a missing or corrupt file is a `BadRecord`."""
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        where = "image bytes" if isinstance(image, bytes) else str(image)
        raise BadRecord(record_id, f"cannot read image {where}: {err}", "bad image") from err


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of `fill` colour (LLaVA's `pad` aspect ratio)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class ConversationEncoder:
    """Turns a `Sample` into `input_ids`, `labels` and `pixel_values`.

    `chat_template` is what `templates.chat_template` returns. A Jinja template is rendered
    and tokenized in one pass by transformers, its generation blocks giving the labels. A
    `SeparatorFormat` (LLaVA's formats) is tokenized as LLaVA's `tokenizer_image_token` does:
    the text between images one piece at a time, each with the tokenizer's own leading
    handling (SentencePiece's dummy prefix), the tokens the tokenizer puts in front of a text
    (`<s>`) once at the start, and the image token between pieces; labels come from each
    token's characters.

    Labels are -100 everywhere but the answers. Each `<image>` token is expanded to
    `image_seq_length` copies after tokenization, so the count of image tokens always equals
    the count of image features. A sample longer than `max_length` is cut at the end, but
    never through or before an image's tokens, and never down to no answer tokens: those are
    `BadRecord`s.
    """

    def __init__(self, tokenizer, image_processor, chat_template: str | SeparatorFormat, image_token: str,
                 image_seq_length: int, max_length: int, pad_to_square: bool = False):
        self.tokenizer, self.image_processor, self.template = tokenizer, image_processor, chat_template
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no token {image_token!r}; add it before encoding")
        self.image_seq_length, self.max_length, self.pad = image_seq_length, max_length, pad_to_square
        mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self.fill = tuple(int(round(255 * m)) for m in mean)
        self.lead_ids = _leading_special_ids(tokenizer) if isinstance(chat_template, SeparatorFormat) else []

    def check(self, sample: Sample) -> None:
        """Structural checks that need no tokenizer."""
        roles = [m["role"] for m in sample.messages if m["role"] != "system"]
        if "user" not in roles:
            raise BadRecord(sample.id, "no human turn", "no human turn")
        if "assistant" not in roles:
            raise BadRecord(sample.id, "no assistant turn", "no answer")
        markers = sum(m["content"].count(IMAGE_MARKER) for m in sample.messages)
        if markers != len(sample.images):
            kind = "more <image> markers than images" if markers > len(sample.images) else \
                "more images than <image> markers"
            raise BadRecord(sample.id, f"{markers} <image> marker(s) but {len(sample.images)} image(s)", kind)
        if any(not m["content"].strip() for m in sample.messages if m["role"] == "assistant"):
            raise BadRecord(sample.id, "an assistant turn is empty", "empty answer")

    def encode_text(self, sample: Sample) -> dict:
        """Token ids and labels, images expanded to their token runs."""
        self.check(sample)
        ids, labels = self._expand_images(*self._tokenize(sample, add_generation_prompt=False, labels=True))
        if len(ids) > self.max_length:
            if self.image_token_id in ids[self.max_length:]:
                raise BadRecord(sample.id, f"{len(ids)} tokens: cutting to max_length {self.max_length} would cut "
                                "an image's tokens", "image cut by truncation")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(lab == -100 for lab in labels):
            raise BadRecord(sample.id, f"no answer tokens left within max_length {self.max_length}",
                            "empty answer after truncation")
        return {"input_ids": ids, "labels": labels}

    def encode_prompt(self, sample: Sample) -> list[int]:
        """Token ids of a conversation that ends with a user turn, followed by the
        format's cue for the assistant to answer (for generation)."""
        ids, _ = self._tokenize(sample, add_generation_prompt=True, labels=False)
        return self._expand_images(ids, ids)[0]

    def token_ids(self, sample: Sample) -> list[int]:
        """The conversation's token ids as the format writes and tokenizes it, one image token
        per image, nothing checked, expanded or cut (for sizing samples)."""
        return self._tokenize(sample, add_generation_prompt=False, labels=False)[0]

    def _tokenize(self, sample: Sample, add_generation_prompt: bool, labels: bool) -> tuple[list[int], list | None]:
        """The format's ids, one image token per image, and with `labels` their labels (the
        answers' tokens, -100 elsewhere): a `SeparatorFormat` piece by piece, a Jinja
        template through transformers, its generation blocks marking the answers."""
        if isinstance(self.template, SeparatorFormat):
            return self._encode_pieces(sample, add_generation_prompt)
        enc = self.tokenizer.apply_chat_template(sample.messages, chat_template=self.template, tokenize=True,
                                                 add_generation_prompt=add_generation_prompt, return_dict=True,
                                                 return_assistant_tokens_mask=labels)
        if not labels:
            return enc["input_ids"], None
        return enc["input_ids"], [tok if in_answer else -100
                                  for tok, in_answer in zip(enc["input_ids"], enc["assistant_masks"], strict=True)]

    def _expand_images(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        out_ids, out_labels = [], []
        for tok, lab in zip(ids, labels, strict=True):
            if tok == self.image_token_id:
                out_ids += [tok] * self.image_seq_length
                out_labels += [-100] * self.image_seq_length
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        return out_ids, out_labels

    def _encode_pieces(self, sample: Sample, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        """A `SeparatorFormat` conversation's ids and labels, one image token per image."""
        roles = [m["role"] for m in sample.messages if m["role"] != "system"]
        if any(r != ("user", "assistant")[k % 2] for k, r in enumerate(roles)):
            raise BadRecord(sample.id, f"turns must alternate user, assistant, ... from a user turn; found {roles}",
                            "turn order")
        text, answers = "", []
        for piece, in_answer in self.template.pieces(sample.messages, self.tokenizer.eos_token,
                                                     add_generation_prompt):
            if in_answer:
                answers.append((len(text), len(text) + len(piece)))
            text += piece
        ids, labels = list(self.lead_ids), [-100] * len(self.lead_ids)
        start = 0
        for k, chunk in enumerate(text.split(IMAGE_MARKER)):
            if k:
                ids.append(self.image_token_id)
                labels.append(-100)
            enc = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
                a, b = a + start, b + start
                inside = any(s <= a and b <= e for s, e in answers)
                if not inside and any(a < e and s < b for s, e in answers):
                    raise BadRecord(sample.id, f"token {self.tokenizer.convert_ids_to_tokens(tok)!r} "
                                    f"({text[a:b]!r}) straddles the start or end of an answer", "answer boundary")
                ids.append(tok)
                labels.append(tok if inside else -100)
            start += len(chunk) + len(IMAGE_MARKER)
        return ids, labels

    def images(self, sample: Sample) -> torch.Tensor | None:
        """Preprocessed pixel values of the sample's images, or None for text-only."""
        if not sample.images:
            return None
        pil = [open_image(im, sample.id) for im in sample.images]
        if self.pad:
            pil = [pad_to_square(im, self.fill) for im in pil]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text on its own (Llama's `<s>`; none for
    GPT-2-style tokenizers)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k]
    raise ValueError(f"the tokenizer encodes 'a' as {bare} alone but {full} with its special tokens")
