"""New tokens on a tokenizer and its LM, their rows started from the mean of the old ones."""

from __future__ import annotations

import torch


def add_tokens(tokenizer, lm, tokens: list[str]) -> list[int]:
    """Add special tokens (those missing), grow the LM's input embeddings and output head
    to match with every new row at the mean of the old rows (deterministic, so a rebuilt
    model is identical), and return the tokens' ids."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    old = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > old:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for matrix in {id(m): m for m in (lm.get_input_embeddings(), lm.get_output_embeddings())}.values():
                matrix.weight[old:] = matrix.weight[:old].mean(0, keepdim=True)
    return tokenizer.convert_tokens_to_ids(tokens)
