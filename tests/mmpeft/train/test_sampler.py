import random
from collections import Counter

import pytest

from mmpeft.train.sampler import GroupedBatchSampler


def _data(images: int, texts: int, seed: int = 0) -> tuple[list[int], list[bool]]:
    """Distinct lengths in random order, images and texts interleaved at random."""
    rng = random.Random(seed)
    has_image = [True] * images + [False] * texts
    rng.shuffle(has_image)
    lengths = list(range(10, 10 + images + texts))
    rng.shuffle(lengths)
    return lengths, has_image


def _epoch(lengths, has_image, world: int, epoch: int = 0, **kwargs) -> list[list[list[int]]]:
    """Each rank's micro-batches for one epoch."""
    ranks = []
    for rank in range(world):
        sampler = GroupedBatchSampler(lengths, has_image, world_size=world, rank=rank, **kwargs)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
    return ranks


def test_batches_never_mix_modalities_and_ranks_step_through_the_same_modality():
    lengths, has_image = _data(images=13, texts=21)
    ranks = _epoch(lengths, has_image, world=2, micro_batch=2, grad_accum=2)
    assert len(ranks[0]) == len(ranks[1]) == 10  # global batches of 8: 2 of images, 3 of texts; 2 each per rank
    for step in zip(*ranks, strict=True):
        modalities = {has_image[i] for mb in step for i in mb}
        assert len(modalities) == 1, step
    ungrouped = _epoch(lengths, has_image, world=2, micro_batch=2, grad_accum=2, group_by_modality=False)
    assert any(len({has_image[i] for i in mb}) == 2 for mb in ungrouped[0])  # this data does mix without grouping


def test_each_index_comes_once_per_epoch_in_disjoint_shares_of_the_ranks():
    lengths, has_image = _data(images=16, texts=24)
    ranks = _epoch(lengths, has_image, world=2, micro_batch=2, grad_accum=2)
    shares = [[i for mb in r for i in mb] for r in ranks]
    assert sorted(shares[0] + shares[1]) == list(range(40))
    assert len(shares[0]) == len(shares[1]) == 20
    sampler = GroupedBatchSampler(lengths, has_image, 2, world_size=2, rank=1, grad_accum=2)
    assert len(sampler) == len(ranks[1]) == 10 and sampler.repeated == 0


def test_a_modality_short_of_a_full_global_batch_is_topped_up_with_its_own_indices():
    lengths, has_image = _data(images=1, texts=6)
    (micro_batches,) = _epoch(lengths, has_image, world=1, micro_batch=2, grad_accum=2)
    counts = Counter(i for mb in micro_batches for i in mb)
    image = has_image.index(True)
    assert set(counts) == set(range(7)) and counts[image] == 4  # 1 image repeated to fill a global batch of 4
    assert sum(counts.values()) == 12 and sum(c - 1 for i, c in counts.items() if not has_image[i]) == 2
    sampler = GroupedBatchSampler(lengths, has_image, 2, grad_accum=2)
    assert len(sampler) == 6 and sampler.repeated == 5
    ungrouped = GroupedBatchSampler(lengths, has_image, 2, grad_accum=2, group_by_modality=False)
    assert len(ungrouped) == 4 and ungrouped.repeated == 1  # 7 samples, one short of 8


def test_the_order_depends_only_on_seed_and_epoch():
    lengths, has_image = _data(images=16, texts=24)
    first = _epoch(lengths, has_image, world=2, micro_batch=2, seed=3)
    assert _epoch(lengths, has_image, world=2, micro_batch=2, seed=3) == first
    assert _epoch(lengths, has_image, world=2, micro_batch=2, seed=4) != first
    assert _epoch(lengths, has_image, world=2, micro_batch=2, seed=3, epoch=1) != first


def test_the_modalities_take_turns_over_an_epoch():
    lengths, has_image = _data(images=16, texts=24)
    (micro_batches,) = _epoch(lengths, has_image, world=1, micro_batch=2, grad_accum=2)
    steps = [has_image[first[0]] for first in micro_batches[::2]]
    assert sorted(steps) == [False] * 6 + [True] * 4  # global batches of 4
    assert steps not in (sorted(steps), sorted(steps, reverse=True))  # the global batches are shuffled


def test_each_global_batch_is_sorted_by_length_longest_first():
    lengths, has_image = _data(images=16, texts=24)
    (micro_batches,) = _epoch(lengths, has_image, world=1, micro_batch=2, grad_accum=2)
    # one optimizer step's two micro-batches form a global batch of 4
    for first, second in zip(micro_batches[::2], micro_batches[1::2], strict=True):
        step_lengths = [lengths[i] for i in first + second]
        assert step_lengths == sorted(step_lengths, reverse=True)


def test_a_skip_resumes_inside_the_epoch():
    lengths, has_image = _data(images=16, texts=24)
    sampler = GroupedBatchSampler(lengths, has_image, 2, world_size=2, rank=1, grad_accum=2, seed=1)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, skip_micro_batches=3)
    assert list(sampler) == whole[3:] and len(sampler) == len(whole)


def test_lengths_and_modalities_must_match():
    with pytest.raises(ValueError, match="same length"):
        GroupedBatchSampler([1, 2, 3], [True, False], 2)
