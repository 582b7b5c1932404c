"""Multimodal conversations turned into model inputs whose labels cover the assistant's
answers and nothing else.

A `Sample` is one conversation: `messages` (user / assistant turns, `<image>` where an
image goes) and the images they refer to; `mmpeft.data.readers` builds them from the
formats users have. An image is a path, encoded bytes, or a `ShardMember` (an image
inside a tar shard, read when needed); `image_bytes` and `open_image` take any of them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmpeft.data.shards import ShardMember
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
    """One conversation with the images its `<image>` markers refer to, in order (paths,
    bytes or `ShardMember`s). `problem`: `(reason, kind)` when a reader found the record bad;
    the dataset then stops on it, or with `skip_bad_records` leaves it out and counts it."""

    id: str
    messages: list[dict]
    images: list = field(default_factory=list)
    problem: tuple[str, str] | None = None


def bad_sample(record_id: str, reason: str, kind: str) -> Sample:
    """A record a reader could not read (`Sample.problem`), kept for the dataset to judge."""
    return Sample(record_id, [], problem=(reason, kind))


def image_bytes(image) -> bytes:
    """The encoded bytes of an image in any form a `Sample` holds: a path, bytes or a
    `ShardMember`."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, ShardMember):
        return image.read_bytes()
    return Path(image).read_bytes()


def open_image(image, record_id: str) -> Image.Image:
    """Decode an image (path, bytes or `ShardMember`) to RGB; a missing or corrupt one is a
    `BadRecord`."""
    try:
        with Image.open(io.BytesIO(image_bytes(image)) if isinstance(image, bytes | ShardMember) else image) as im:
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
        return self._finish(sample, *self._tokenize(sample, add_generation_prompt=False, labels=True))

    def encode_texts(self, samples: list[Sample]) -> list[dict | BadRecord]:
        """`encode_text` of each sample, a bad one's entry its `BadRecord`. A `SeparatorFormat`
        sends every sample's text to the tokenizer in one call, which is several times faster
        than one call a sample when preparing many."""
        if not isinstance(self.template, SeparatorFormat):
            return [_or_bad(lambda s=s: self.encode_text(s)) for s in samples]
        out: list = [None] * len(samples)
        jobs = []
        for k, sample in enumerate(samples):
            try:
                self.check(sample)
                jobs.append((k, *self._format(sample, add_generation_prompt=False)))
            except BadRecord as err:
                out[k] = err
        chunks = [chunk for _, text, _ in jobs for chunk in text.split(IMAGE_MARKER)]
        encoded = iter(_tokenize_many(self.tokenizer, chunks))
        for k, text, answers in jobs:
            pieces = [next(encoded) for _ in range(text.count(IMAGE_MARKER) + 1)]
            out[k] = _or_bad(lambda k=k, text=text, answers=answers, pieces=pieces: self._finish(
                samples[k], *self._assemble(samples[k], text, answers, [(e.ids, e.offsets) for e in pieces])))
        return out

    def _finish(self, sample: Sample, ids: list[int], labels: list[int]) -> dict:
        """Images expanded to their runs, cut to `max_length` where that is safe."""
        ids, labels = self._expand_images(ids, labels)
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
        at = [k for k, tok in enumerate(ids) if tok == self.image_token_id]
        if not at:
            return ids, labels
        out_ids, out_labels, start = [], [], 0
        for k in at:
            out_ids += ids[start:k] + [self.image_token_id] * self.image_seq_length
            out_labels += labels[start:k] + [-100] * self.image_seq_length
            start = k + 1
        return out_ids + ids[start:], out_labels + labels[start:]

    def _encode_pieces(self, sample: Sample, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        """A `SeparatorFormat` conversation's ids and labels, one image token per image."""
        text, answers = self._format(sample, add_generation_prompt)
        pieces = []
        for chunk in text.split(IMAGE_MARKER):
            enc = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            pieces.append((enc["input_ids"], enc["offset_mapping"]))
        return self._assemble(sample, text, answers, pieces)

    def _format(self, sample: Sample, add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """A `SeparatorFormat` conversation's text and the character spans of its answers."""
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
        return text, answers

    def _assemble(self, sample: Sample, text: str, answers: list[tuple[int, int]],
                  pieces: list[tuple[list[int], list]]) -> tuple[list[int], list[int]]:
        """Ids and labels from the tokenized text between images (`pieces`: ids and character
        offsets of each): the leading special ids, an image token between pieces, and each
        token labelled when it lies inside an answer's characters."""
        shift, parts = 0, []
        for k, ((chunk_ids, offsets), chunk) in enumerate(zip(pieces, text.split(IMAGE_MARKER), strict=True)):
            if k:
                parts.append(([self.image_token_id], [(-1, -1)]))
            parts.append((chunk_ids, [(a + shift, b + shift) for a, b in offsets]))
            shift += len(chunk) + len(IMAGE_MARKER)
        ids = np.array([t for chunk_ids, _ in parts for t in chunk_ids], dtype=np.int64)
        spans = np.array([o for _, offsets in parts for o in offsets], dtype=np.int64).reshape(-1, 2)
        a, b = spans[:, 0], spans[:, 1]
        starts = np.array([s for s, _ in answers], dtype=np.int64)
        ends = np.array([e for _, e in answers], dtype=np.int64)
        inside = np.zeros(len(ids), dtype=bool)
        if len(answers):
            # the last answer starting at or before a token's start holds it if it ends at or after the token's end;
            # the last answer starting before its end overlaps it if it ends after the token's start
            j = np.searchsorted(starts, a, side="right") - 1
            inside = (j >= 0) & (b <= ends[j.clip(0)])
            q = np.searchsorted(starts, b, side="left") - 1
            overlaps = (q >= 0) & (a < ends[q.clip(0)])
            image = ids == self.image_token_id
            inside &= ~image
            cut = np.flatnonzero(overlaps & ~inside & ~image)
            if len(cut):
                k = cut[0]
                raise BadRecord(sample.id, f"token {self.tokenizer.convert_ids_to_tokens(int(ids[k]))!r} "
                                f"({text[a[k]:b[k]]!r}) straddles the start or end of an answer", "answer boundary")
        labels = np.where(inside, ids, -100)
        return list(self.lead_ids) + ids.tolist(), [-100] * len(self.lead_ids) + labels.tolist()

    def images(self, sample: Sample) -> torch.Tensor | None:
        """Preprocessed pixel values of the sample's images, or None for text-only."""
        if not sample.images:
            return None
        pil = [open_image(im, sample.id) for im in sample.images]
        if self.pad:
            pil = [pad_to_square(im, self.fill) for im in pil]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]


def _tokenize_many(tokenizer, texts: list[str]) -> list:
    """Each text's encoding (`ids`, `offsets`), as `tokenizer(text, add_special_tokens=False)`
    gives them, in one call: a fast tokenizer's Rust backend directly (the Python wrapper's
    conversion costs more than the tokenizing), another tokenizer one text at a time."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode_batch(texts, add_special_tokens=False)
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True).encodings


def _or_bad(encode):
    """`encode()`, or the `BadRecord` it raised."""
    try:
        return encode()
    except BadRecord as err:
        return err


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text on its own (Llama's `<s>`; none for
    GPT-2-style tokenizers)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k]
    raise ValueError(f"the tokenizer encodes 'a' as {bare} alone but {full} with its special tokens")
