"""A torch dataset of encoded conversations, checked in full before training starts."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmpeft.data.conversation import BadRecord, ConversationEncoder, Sample
from mmpeft.data.feature_cache import VisionFeatureCache, image_digest


class ConversationDataset(Dataset):
    """Encodes every sample's text and checks every image up front, so a bad record stops
    the run before any compute is spent (or, with `skip_bad_records`, is left out and
    counted by reason in `skipped`). A conversation that opens with an assistant turn loses
    that turn, as LLaVA's preprocessing drops it, counted in `dropped_turns`. Images are
    decoded when a batch needs them, or, given a built `VisionFeatureCache`, their features
    are read from it (`image_features`)."""

    def __init__(self, samples: list[Sample], encoder: ConversationEncoder, skip_bad_records: bool = False,
                 check_images: bool = True, features: VisionFeatureCache | None = None, source: str | None = None):
        self.encoder, self.features = encoder, features
        self.items: list[tuple[Sample, dict]] = []
        self.skipped: Counter = Counter()
        self.skipped_ids: list[str] = []
        self.dropped_turns = 0
        for sample in samples:
            if len(sample.messages) > 1 and sample.messages[0]["role"] == "assistant":
                sample = replace(sample, messages=sample.messages[1:])
                self.dropped_turns += 1
            try:
                if sample.problem:
                    raise BadRecord(sample.id, *sample.problem)
                encoded = encoder.encode_text(sample)
                if check_images:
                    for image in sample.images:
                        _check_image(image, sample.id)
            except BadRecord as err:
                if not skip_bad_records:  # named with its file, `source`
                    raise BadRecord(err.record_id, err.reason, err.kind, source) from None
                self.skipped[err.kind] += 1
                self.skipped_ids.append(err.record_id)
                continue
            self.items.append((sample, encoded))
        if not self.items:
            raise ValueError(f"no usable records (skipped: {dict(self.skipped)})")
        self.digests = [[image_digest(im) for im in s.images] for s, _ in self.items] if features else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        sample, encoded = self.items[i]
        if self.features is not None:
            feats = [self.features.get(d) for d in self.digests[i]]
            return {**encoded, "image_features": torch.stack(feats) if feats else None, "id": sample.id}
        return {**encoded, "pixel_values": self.encoder.images(sample), "id": sample.id}

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for _, e in self.items]

    @property
    def has_image(self) -> list[bool]:
        return [bool(s.images) for s, _ in self.items]

    def skip_report(self) -> str:
        """One line saying what was skipped and why, and how many leading assistant turns were
        dropped (empty when neither happened)."""
        parts = []
        if self.skipped:
            reasons = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items()))
            shown = ", ".join(self.skipped_ids[:5]) + (" ..." if len(self.skipped_ids) > 5 else "")
            parts.append(f"skipped {sum(self.skipped.values())} record(s): {reasons} (ids: {shown})")
        if self.dropped_turns:
            parts.append(f"{self.dropped_turns} conversation(s) opened with an assistant turn, dropped as LLaVA does")
        return "; ".join(parts)


def _check_image(image, record_id: str) -> None:
    if isinstance(image, bytes):
        return
    try:
        with Image.open(Path(image)) as im:
            im.verify()
    except (OSError, ValueError) as err:
        raise BadRecord(record_id, f"cannot read image {image}: {err}", "bad image") from err


def pad_tokens(rows: list[dict], pad_id: int) -> dict:
    """`input_ids`, `labels` and `attention_mask` of `rows`, right-padded (labels with -100)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[k, :n], labels[k, :n], mask[k, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_conversations(pad_id: int):
    """A collate function: right padding, labels padded with -100, the batch's images (or
    cached image features) stacked in sample order (text-only samples add none)."""

    def collate(rows: list[dict]) -> dict:
        batch = pad_tokens(rows, pad_id)
        for key in ("pixel_values", "image_features"):
            images = [r[key] for r in rows if r.get(key) is not None]
            if images:
                batch[key] = torch.cat(images)
        return batch

    return collate
