"""GILL's training data: each caption pair becomes a captioning pass (image tokens, then the
caption) and an image pass (the caption, then `[IMG0]`..`[IMG7]`), with the image's CLIP
embedding (input and retrieval target) and the caption's SD text encoding (generation
target), all computed by frozen models and so cacheable.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import torch
from torch.utils.data import Dataset

from mmpeft.data.conversation import BadRecord, Sample, open_image
from mmpeft.data.diffusion_targets import FrozenOutputs, _weights_key
from mmpeft.data.feature_cache import TensorCache
from mmpeft.data.readers import caption_sample
from mmpeft.data.stories import caption_voken_sample


class ClipEmbeddings(FrozenOutputs):
    """CLIP's pooled image embedding (the vision tower's pooler output, GILL's input and
    retrieval target), cached under `cache_root` when one is given."""

    what = "images"

    def __init__(self, vision_tower, image_processor, cache_root: str | os.PathLike | None = None):
        self.vision, self.processor = vision_tower, image_processor
        super().__init__(TensorCache(cache_root, "clip-pooled-" + _weights_key(vision_tower)) if cache_root else None)

    @torch.no_grad()
    def encode(self, images: list) -> torch.Tensor:
        pil = [open_image(im, str(im)[:80]) for im in images]
        pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]
        weight = next(self.vision.parameters())
        return self.vision(pixel_values=pixels.to(weight.device, weight.dtype)).pooler_output


def image_pass_labels(input_ids: list[int], labels: list[int], voken_ids: list[int]) -> list[int]:
    """`labels` of an image pass with every position after `[IMG0]` set to -100: GILL's code
    cuts the labels at `[IMG1]` (`label[k:] = -100`), so the LM learns when an image comes and
    nothing after. A chat template's end-of-turn token after `[IMG7]` would otherwise be a
    label read from the `[IMG]` rows: the frozen LM never saw them, and that loss's gradient
    outweighs the retrieval and generation losses' on the rows the heads read."""
    first = input_ids.index(voken_ids[0]) if voken_ids[0] in input_ids else len(input_ids)
    return labels[:first + 1] + [-100] * (len(labels) - first - 1)


class GillDataset(Dataset):
    """Both passes of every caption pair encoded up front; a record that cannot be encoded
    (no caption tokens left, vokens cut) stops the run with its id, or with
    `skip_bad_records` is counted in `skipped`."""

    def __init__(self, pairs: list[Sample], encoder, voken_ids: list[int], prompt: str, clip: ClipEmbeddings,
                 captions, skip_bad_records: bool = False):
        self.clip, self.captions = clip, captions
        self.items, self.skipped = [], Counter()
        for pair in pairs:
            try:
                if pair.problem:  # a reader's bad record
                    raise BadRecord(pair.id, *pair.problem)
                image, caption = pair.images[0], pair.messages[-1]["content"]
                cap = encoder.encode_text(caption_sample(pair.id, image, caption))
                img = encoder.encode_text(caption_voken_sample(pair.id, image, caption, prompt).sample)
                if img["input_ids"].count(voken_ids[-1]) != 1:
                    raise BadRecord(pair.id, "the [IMG] run is cut by max_length", "vokens cut")
            except BadRecord as err:
                if not skip_bad_records:
                    raise
                self.skipped[err.kind] += 1
                continue
            img["labels"] = image_pass_labels(img["input_ids"], img["labels"], voken_ids)
            self.items.append((image, caption, cap, img))
        if not self.items:
            raise ValueError(f"no usable caption pairs (skipped: {dict(self.skipped)})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, caption, cap, img = self.items[i]
        clip = self.clip([image])
        return {**cap, "img_input_ids": img["input_ids"], "img_labels": img["labels"], "clip_embeds": clip,
                "target_clip": clip, "caption_embeds": self.captions([caption])}

    @property
    def lengths(self) -> list[int]:
        return [len(c["input_ids"]) + len(m["input_ids"]) for _, _, c, m in self.items]

    def skip_report(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items()))


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        out[k, :len(r)], mask[k, :len(r)] = torch.tensor(r), 1
    return out, mask


def concat_captions(rows: list[dict], lead: int) -> list[dict]:
    """GILL's multi-example signal: each captioning sequence followed by the next row's (the
    last by the first's), that row's leading special tokens dropped, so the LM captions a
    second image after a first caption. The image passes stay as they are."""
    out = []
    for k, row in enumerate(rows):
        nxt = rows[(k + 1) % len(rows)]
        out.append({**row, "input_ids": row["input_ids"] + nxt["input_ids"][lead:],
                    "labels": row["labels"] + nxt["labels"][lead:],
                    "clip_embeds": torch.cat([row["clip_embeds"], nxt["clip_embeds"]])})
    return out


def collate_gill(pad_id: int, concat_p: float = 0.0, lead: int = 0, seed: int = 0):
    """Right-padded passes (labels padded with -100) and the stacked embeddings. With
    probability `concat_p` a batch's captioning sequences are joined in pairs
    (`concat_captions`; `lead`: the encoder's leading special tokens); the draw depends on
    the seed and the batch's first sequence only, so a resumed run draws as the first did."""

    def collate(rows: list[dict]) -> dict:
        if concat_p > 0 and len(rows) > 1:
            draw = random.Random(hash((seed, *rows[0]["input_ids"]))).random()
            if draw < concat_p:
                rows = concat_captions(rows, lead)
        batch = {}
        for prefix in ("", "img_"):
            batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"] = _pad(
                [r[f"{prefix}input_ids"] for r in rows], pad_id)
            batch[f"{prefix}labels"], _ = _pad([r[f"{prefix}labels"] for r in rows], -100)
        for key in ("clip_embeds", "target_clip", "caption_embeds"):
            batch[key] = torch.cat([r[key] for r in rows])
        return batch

    return collate
