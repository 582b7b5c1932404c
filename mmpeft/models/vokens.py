"""Generative image tokens ("vokens" in MiniGPT-5, `[IMG]` tokens in GILL): new tokens
appended to the LM's vocabulary whose embedding and output-head rows alone train, and
the positions whose hidden states carry an image to the heads.

The rule for the text loss: `[IMG0]` is a label (the LM decides when an image belongs),
`[IMG1]`..`[IMG{n-1}]` are not (once `[IMG0]` is out, inference appends the rest by rule,
so their states are free to carry the image rather than to predict the next voken), and
the token after the run is a label as any text is. MiniGPT-5's code meant this, but its
slice `index+1 : index+n-1` stops one short and leaves the last voken in the loss.

The features of an occurrence are the last-layer states that *predict* its vokens: the
position before `[IMG0]` through the one before `[IMG{n-1}]`.
"""

from __future__ import annotations

import torch

from mmpeft.models.tokens import add_tokens


def voken_names(n: int = 8) -> list[str]:
    """`[IMG0]` .. `[IMG{n-1}]`."""
    return [f"[IMG{i}]" for i in range(n)]


def add_vokens(tokenizer, lm, n: int = 8) -> list[int]:
    """Add the `n` vokens to tokenizer and LM (new rows at the mean of the old ones);
    returns their ids in order."""
    return add_tokens(tokenizer, lm, voken_names(n))


def mask_forced_vokens(input_ids: list[int], labels: list[int], voken_ids: list[int]) -> list[int]:
    """`labels` with every voken after `[IMG0]` set to -100 (see the rule above)."""
    forced = set(voken_ids[1:])
    return [-100 if tok in forced else lab for tok, lab in zip(input_ids, labels, strict=True)]


def voken_starts(input_ids: torch.Tensor, voken_ids: list[int]) -> torch.Tensor:
    """`(k, 2)` tensor of (row, position of `[IMG0]`) for every complete voken run in
    `input_ids` `(batch, length)`, in row-major order. A run that is incomplete or out of
    order is an error: its features would be read from the wrong positions."""
    starts = torch.nonzero(input_ids == voken_ids[0])
    run = torch.tensor(voken_ids, device=input_ids.device)
    n = len(voken_ids)
    for row, pos in starts.tolist():
        if pos == 0 or pos + n > input_ids.shape[1] or not torch.equal(input_ids[row, pos:pos + n], run):
            raise ValueError(f"batch row {row}: the voken run starting at position {pos} is not "
                             f"[IMG0]..[IMG{n - 1}] in order after at least one token")
    others = torch.isin(input_ids, run[1:]).sum().item()
    if others != len(starts) * (n - 1):
        raise ValueError(f"batch holds {others} vokens after [IMG0] but {len(starts)} run(s) of {n}")
    return starts


def voken_features(hidden: torch.Tensor, starts: torch.Tensor, n: int, shift: int = -1) -> torch.Tensor:
    """`(k, n, width)`: for each run, the states at positions start+shift .. start+shift+n-1
    of `hidden` `(batch, length, width)`. The default `shift=-1` reads the states that
    predict `[IMG0]` .. `[IMG{n-1}]` (MiniGPT-5); `shift=0` those at the vokens (GILL)."""
    if len(starts) == 0:
        return hidden.new_zeros((0, n, hidden.shape[-1]))
    offsets = torch.arange(shift, shift + n, device=hidden.device)
    rows = starts[:, 0:1].expand(-1, n)
    cols = starts[:, 1:2] + offsets
    return hidden[rows, cols]


def trainable_token_targets(model) -> dict[str, str]:
    """Module names of the input embeddings and (when not tied to them) the output head,
    for PEFT's `trainable_token_indices`."""
    names = {m: n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    targets = {"embeddings": names[emb]}
    if head is not None and head.weight is not emb.weight:
        targets["head"] = names[head]
    return targets
