"""General-GPT's embedding tokens on any causal LM: a precomputed vector (a CLIP image
embedding, a sentence embedding, an audio encoder's output) goes in as an input
embedding, and comes out as a regression from the state at an out-token.

    [CLIP IN] <emb> [\\CLIP IN] Caption: a red square.   captioning: the vector, mapped by
                                                         `embed_in` to the LM's width, is
                                                         the input embedding at `<emb>`;
                                                         LM loss on the caption
    Caption: a red square. [CLIP OUT][\\CLIP OUT]         retrieval: `embed_out` of the last
                                                         layer's state at `[CLIP OUT]` is
                                                         pulled to the vector by MSE; LM
                                                         loss on the whole text
    <emb> a red square.                                  sentence reconstruction: LM loss

Retrieval at inference appends `[CLIP OUT]` to the text and takes the nearest vectors of
an index to the regressed one.
"""

from __future__ import annotations

import torch
from torch import nn

from mmpeft.models.tokens import add_tokens

TOKENS = ["[CLIP IN]", "[\\CLIP IN]", "<emb>", "[CLIP OUT]", "[\\CLIP OUT]"]
TASKS = ("caption", "retrieval", "sentence")


class GeneralGPT(nn.Module):
    """The LM with the two linear maps; `token_ids` maps each of `TOKENS` to its id."""

    def __init__(self, lm, token_ids: dict[str, int], embed_dim: int, mse_weight: float = 1.0):
        super().__init__()
        width = lm.config.hidden_size
        self.lm, self.token_ids, self.mse_weight = lm, token_ids, mse_weight
        self.embed_in = nn.Linear(embed_dim, width)
        self.embed_out = nn.Linear(width, embed_dim)

    def input_embeddings(self, input_ids: torch.Tensor, vectors_in: torch.Tensor | None) -> torch.Tensor:
        embeds = self.lm.get_input_embeddings()(input_ids)
        slots = input_ids == self.token_ids["<emb>"]
        if int(slots.sum()) != (0 if vectors_in is None else vectors_in.shape[0]):
            raise ValueError(f"{int(slots.sum())} <emb> slot(s) but "
                             f"{0 if vectors_in is None else vectors_in.shape[0]} input vector(s)")
        if vectors_in is None:
            return embeds
        mapped = self.embed_in(vectors_in.to(self.embed_in.weight.dtype)).to(embeds.dtype)
        return embeds.masked_scatter(slots[..., None], mapped)

    def out_states(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The regressed vectors: `embed_out` of the last layer's state at each `[CLIP OUT]`,
        in reading order."""
        return self.embed_out(hidden[input_ids == self.token_ids["[CLIP OUT]"]].to(self.embed_out.weight.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                vectors_in: torch.Tensor | None = None, vectors_out: torch.Tensor | None = None,
                num_items_in_batch=None) -> dict:
        out = self.lm(inputs_embeds=self.input_embeddings(input_ids, vectors_in), attention_mask=attention_mask,
                      labels=labels, output_hidden_states=True, num_items_in_batch=num_items_in_batch)
        mse = out.loss.new_zeros(())
        if vectors_out is not None and vectors_out.shape[0]:
            predicted = self.out_states(input_ids, out.hidden_states[-1])
            mse = nn.functional.mse_loss(predicted, vectors_out.to(predicted.dtype))
        return {"loss": out.loss + self.mse_weight * mse, "lm_loss": out.loss.detach(), "mse_loss": mse.detach()}

    @torch.no_grad()
    def regress(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The vector regressed at each row's `[CLIP OUT]` (one per row)."""
        out = self.lm(inputs_embeds=self.input_embeddings(input_ids, None), attention_mask=attention_mask,
                      output_hidden_states=True)
        return self.out_states(input_ids, out.hidden_states[-1])

    @torch.no_grad()
    def caption(self, vectors: torch.Tensor, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Greedy text after `prompt_ids` (holding one `<emb>`) for each vector: the new ids."""
        ids = torch.tensor([prompt_ids] * vectors.shape[0], device=vectors.device)
        embeds = self.input_embeddings(ids, vectors)
        return self.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, **kwargs)


def add_general_gpt_tokens(tokenizer, lm) -> dict[str, int]:
    """Add the five tokens (new rows at the mean of the old) and return their ids."""
    return dict(zip(TOKENS, add_tokens(tokenizer, lm, TOKENS), strict=True))


def _pieces(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """The ids of " Caption:" and of the text (tokenized apart, so prompts and training agree)."""
    return (tokenizer(" Caption:", add_special_tokens=False)["input_ids"],
            tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])


def encode_sample(tokenizer, task: str, text: str, max_length: int) -> dict:
    """Token ids and labels of one sample (see the module's docstring); `<emb>` and the
    tokens around it never carry loss. A long text is cut so that what the task needs at
    its end (`[CLIP OUT]`, end of sequence) stays."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    caption, body = _pieces(tokenizer, text)
    eos = [tokenizer.eos_token_id]
    if task == "retrieval":
        suffix = tokenizer.convert_tokens_to_ids(["[CLIP OUT]", "[\\CLIP OUT]"]) + eos
        full = (caption + body)[: max_length - len(suffix)] + suffix
        return {"input_ids": full, "labels": list(full)}
    prefix = caption_prompt(tokenizer) if task == "caption" else tokenizer.convert_tokens_to_ids(["<emb>"])
    target = body[: max_length - len(prefix) - 1] + eos
    return {"input_ids": prefix + target, "labels": [-100] * len(prefix) + target}


def retrieval_prompt(tokenizer, text: str) -> list[int]:
    """The ids that end at `[CLIP OUT]`, whose state is regressed."""
    caption, body = _pieces(tokenizer, text)
    return caption + body + [tokenizer.convert_tokens_to_ids("[CLIP OUT]")]


def caption_prompt(tokenizer) -> list[int]:
    """`[CLIP IN] <emb> [\\CLIP IN] Caption:`, after which the caption is generated."""
    return tokenizer.convert_tokens_to_ids(["[CLIP IN]", "<emb>", "[\\CLIP IN]"]) + \
        tokenizer(" Caption:", add_special_tokens=False)["input_ids"]

