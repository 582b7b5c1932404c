"""New tokens on a tokenizer and its LM, their rows started from the mean of the trained ones."""

from __future__ import annotations

import torch


def add_tokens(tokenizer, lm, tokens: list[str], base_tokens: int | None = None) -> list[int]:
    """Add special tokens (those missing) to the tokenizer, grow the LM's input embeddings
    and output head when they have too few rows, and return the tokens' ids.

    The rows of the new tokens, every id at or past `base_tokens`, start at the mean of rows
    `0 .. base_tokens - 1`, the tokens the base model was trained with; deterministic, so a
    rebuilt model is identical. A vocabulary padded past its tokenizer (OPT: 50,272 rows for
    50,265 tokens) would otherwise put new tokens on untrained padding rows. `base_tokens`
    defaults to the tokenizer's length before the missing tokens are added, or to the
    embedding's rows when none is missing (a rebuild from a saved tokenizer, whose base has
    no padding rows); give it when rebuilding on a padded vocabulary.

    Under ZeRO-3 partitioned loading (`mmpeft.train.placement.partitioned_loading`) call it
    inside the same block, on every rank: the resize and the new rows gather the partitioned
    matrices and partition them again."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    old = lm.get_input_embeddings().num_embeddings
    if base_tokens is None:
        base_tokens = len(tokenizer) if missing else old
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if len(tokenizer) > old:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    new = sorted(i for i in ids if i >= base_tokens)
    if new:
        weights = list({id(m.weight): m.weight for m in (lm.get_input_embeddings(), lm.get_output_embeddings())
                        if m is not None}.values())
        with gathered(weights), torch.no_grad():
            for weight in weights:
                weight[new] = weight[:base_tokens].float().mean(0, keepdim=True).to(weight.dtype)
    return ids


def gathered(weights: list[torch.nn.Parameter]):
    """A context in which ZeRO-3 shards among `weights` are whole, and changes made on
    rank 0 are partitioned again on leaving (every rank must enter it); a plain context for
    unpartitioned weights."""
    from contextlib import nullcontext

    from mmpeft.train.placement import is_partitioned

    if not any(is_partitioned(w) for w in weights):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
