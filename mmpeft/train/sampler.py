"""Batches of one modality and similar length, the same on every rank, resumable.

LLaVA found grouping image samples apart from text-only ones, and by length within a
group, worth about 25% speed: less padding, and no batch pays for images it mostly lacks.
"""

from __future__ import annotations

import random


class GroupedBatchSampler:
    """Yields this rank's micro-batches (lists of dataset indices).

    Each epoch the indices of each modality are shuffled (seed + epoch), cut into global
    batches of `micro_batch * world_size * grad_accum`, each sorted by length and dealt
    out as micro-batches, rank `r` taking every `world_size`-th. The order of global
    batches is shuffled too. A modality whose count does not fill its last global batch
    is topped up with its own first indices of the epoch; `repeated` says how many.
    """

    def __init__(self, lengths: list[int], has_image: list[bool], micro_batch: int, world_size: int = 1,
                 rank: int = 0, grad_accum: int = 1, seed: int = 0, group_by_modality: bool = True):
        if len(lengths) != len(has_image):
            raise ValueError("lengths and has_image must have the same length")
        self.lengths, self.has_image = lengths, has_image
        self.micro, self.world, self.rank, self.accum, self.seed = micro_batch, world_size, rank, grad_accum, seed
        self.group_by_modality = group_by_modality
        self.global_batch = micro_batch * world_size * grad_accum
        self.epoch, self.skip = 0, 0
        self.repeated = 0

    def set_epoch(self, epoch: int, skip_micro_batches: int = 0) -> None:
        """Choose the epoch, and how many of this rank's micro-batches to skip (resume)."""
        self.epoch, self.skip = epoch, skip_micro_batches

    def _global_batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{self.epoch}")
        groups = [[i for i, m in enumerate(self.has_image) if m], [i for i, m in enumerate(self.has_image) if not m]]
        if not self.group_by_modality:
            groups = [list(range(len(self.lengths)))]
        batches, self.repeated = [], 0
        for group in groups:
            if not group:
                continue
            rng.shuffle(group)
            short = -len(group) % self.global_batch
            group = group + (group * (short // len(group) + 1))[:short]
            self.repeated += short
            for k in range(0, len(group), self.global_batch):
                batches.append(sorted(group[k:k + self.global_batch], key=lambda i: -self.lengths[i]))
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        count = 0
        for batch in self._global_batches():
            micro = [batch[k:k + self.micro] for k in range(0, len(batch), self.micro)]
            for mb in micro[self.rank::self.world]:
                if count >= self.skip:
                    yield mb
                count += 1

    def __len__(self) -> int:
        """Micro-batches per epoch for this rank (before any skip)."""
        return len(self._global_batches()) * self.accum
