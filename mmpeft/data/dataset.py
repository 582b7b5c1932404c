"""A torch dataset of encoded conversations, checked in full before training starts."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils.data import Dataset

from mmpeft.data.conversation import BadRecord, ConversationEncoder, Sample
from mmpeft.data.feature_cache import VisionFeatureCache, image_digest
from mmpeft.data.prepared import (
    PreparedConversations,
    expand,
    prepare_block,
    prepare_conversations,
    prepared_folder,
)


class ConversationDataset(Dataset):
    """Samples held in memory, encoded and checked in full before training starts, so a bad
    record stops the run before any compute is spent (or, with `skip_bad_records`, is left
    out and counted by reason in `skipped`). A conversation that opens with an assistant
    turn loses that turn, as LLaVA's preprocessing drops it, counted in `dropped_turns`.
    Images are decoded when a batch needs them, or, given a built `VisionFeatureCache`,
    their features are read from it (`image_features`). Sets too large to hold in memory
    go through `mmpeft.data.prepared` instead, which gives the same items."""

    def __init__(self, samples: list[Sample], encoder: ConversationEncoder, skip_bad_records: bool = False,
                 check_images: bool = True, features: VisionFeatureCache | None = None, source: str | None = None):
        self.encoder, self.features = encoder, features
        prepared = prepare_block(samples, encoder, check_images)
        if prepared["bad"] and not skip_bad_records:  # named with its file, `source`
            err = prepared["bad"][0]
            raise BadRecord(err.record_id, err.reason, err.kind, source)
        self.items = [(sample, encoded) for sample, encoded, _ in prepared["kept"]]  # encodings kept small
        self.skipped = Counter(err.kind for err in prepared["bad"])
        self.skipped_ids = [err.record_id for err in prepared["bad"]]
        self.dropped_turns = prepared["dropped_turns"]
        if not self.items:
            raise ValueError(f"no usable records (skipped: {dict(self.skipped)})")
        self.digests = [digests for _, _, digests in prepared["kept"]]  # empty when images were not checked

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        sample, (ids, answer, _) = self.items[i]
        encoded = expand(ids, answer, self.encoder.image_token_id, self.encoder.image_seq_length)
        if self.features is not None:
            feats = [self.features.get(d) for d in self.digests[i] or [image_digest(im) for im in sample.images]]
            return {**encoded, "image_features": torch.stack(feats) if feats else None, "id": sample.id}
        return {**encoded, "pixel_values": self.encoder.images(sample), "id": sample.id}

    def images(self) -> Iterator[tuple[str | None, object]]:
        """(SHA-1 or None, image) of every kept conversation's images, in order (for building
        a feature cache without hashing the images again)."""
        for (sample, _), digests in zip(self.items, self.digests, strict=True):
            yield from zip(digests or [None] * len(sample.images), sample.images, strict=True)

    @property
    def lengths(self) -> list[int]:
        return [n for _, (_, _, n) in self.items]

    @property
    def has_image(self) -> list[bool]:
        return [bool(s.images) for s, _ in self.items]

    def skip_report(self) -> str:
        """One line saying what was skipped and why, and how many leading assistant turns were
        dropped (empty when neither happened)."""
        return skip_line(self.skipped, self.skipped_ids, self.dropped_turns)


def conversation_dataset(samples: Callable[[], Iterable[Sample]], data: object, encoder: ConversationEncoder,
                         prepared_root: str | os.PathLike | None, skip_bad_records: bool, source: str,
                         check_images: bool = True, log=print) -> ConversationDataset | PreparedConversations:
    """A recipe's training conversations. With `prepared_root`, prepared once by every rank
    together into a folder under it named by `data` (what the data is: `files_fingerprint`s,
    a dataset's fingerprint, the image folder) and the encoder's settings, then read lazily;
    later runs of the same data and settings open it at once (`mmpeft.data.prepared`).
    Without, read, encoded and held in memory at every start. Either way, a bad record stops
    the run naming `source` and the record unless `skip_bad_records`, also when the set was
    prepared by a run that skipped it."""
    if prepared_root is None:
        return ConversationDataset(list(samples()), encoder, skip_bad_records, check_images, source=source)
    folder = prepared_folder(prepared_root, data, encoder, check_images)
    prepare_conversations(folder, samples, encoder, skip_bad_records, check_images, source=source, log=log)
    dataset = PreparedConversations(folder, encoder)
    if dataset.first_bad and not skip_bad_records:
        raise BadRecord(*dataset.first_bad, source)
    return dataset


def skip_line(skipped: Counter, skipped_ids: list[str], dropped_turns: int) -> str:
    """What a dataset skipped, by reason, with the first ids, and the leading assistant turns
    it dropped, in one line (empty when neither happened)."""
    parts = []
    if skipped:
        reasons = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
        shown = ", ".join(skipped_ids[:5]) + (" ..." if sum(skipped.values()) > 5 else "")
        parts.append(f"skipped {sum(skipped.values())} record(s): {reasons} (ids: {shown})")
    if dropped_turns:
        parts.append(f"{dropped_turns} conversation(s) opened with an assistant turn, dropped as LLaVA does")
    return "; ".join(parts)


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
