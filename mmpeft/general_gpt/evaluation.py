"""General-GPT's held-out figures: retrieval recall from the `[CLIP OUT]` regression, and
captions reconstructed from vectors."""

from __future__ import annotations

import torch

from mmpeft.eval.answers import _words, word_f1
from mmpeft.eval.retrieval import recall
from mmpeft.general_gpt.model import caption_prompt, retrieval_prompt
from mmpeft.train.placement import device_of


def _by_row(texts: list[tuple[str, int]], limit: int | None) -> tuple[list[int], dict[int, list[str]]]:
    refs: dict[int, list[str]] = {}
    for text, row in texts:
        refs.setdefault(row, []).append(text)
    rows = list(refs)[:limit]
    return rows, refs


@torch.no_grad()
def retrieval_figures(model, tokenizer, vectors: torch.Tensor, texts: list[tuple[str, int]], limit: int | None,
                      clip=None, batch_size: int = 64) -> dict:
    """Recall@1/@5 of each row's vector among the rows' vectors, queried with the row's
    first text; `clip` (model, processor) adds its text encoder's recall as a reference,
    meaningful when the vectors are that CLIP's image embeddings."""
    rows, refs = _by_row(texts, limit)
    queries = [refs[r][0] for r in rows]
    predicted, device = [], device_of(model)
    for start in range(0, len(queries), batch_size):
        prompts = [retrieval_prompt(tokenizer, q) for q in queries[start:start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, p in enumerate(prompts):
            ids[k, :len(p)], mask[k, :len(p)] = torch.tensor(p), 1
        predicted.append(model.regress(ids.to(device), mask.to(device)))
    index = torch.nn.functional.normalize(vectors[rows].float(), dim=-1).to(device)
    scores = torch.nn.functional.normalize(torch.cat(predicted).float(), dim=-1) @ index.T
    truth = torch.arange(len(rows))
    ours = recall(scores, truth)
    n = len(rows)
    figures = {"retrieval_vectors": n, "recall_at_1": ours[1], "recall_at_5": ours[5], "chance_at_1": 1 / n,
               "chance_at_5": min(1.0, 5 / n)}
    if clip is not None:
        from mmpeft.eval.clip_scores import encode_texts

        clip_model, processor = clip
        text = encode_texts(clip_model, processor.tokenizer, queries)
        base = recall(text @ index.T.to(text.device), truth)
        figures |= {"clip_text_recall_at_1": base[1], "clip_text_recall_at_5": base[5]}
    return figures


@torch.no_grad()
def caption_figures(model, tokenizer, vectors: torch.Tensor, texts: list[tuple[str, int]], task: str, limit: int,
                    max_new_tokens: int, batch_size: int = 32) -> dict:
    """Text generated from each row's vector against the row's own texts: exact matches
    (lower case, punctuation ignored) and the best word F1, next to the F1 against another
    row's texts (the same answers, shuffled)."""
    rows, refs = _by_row(texts, limit)
    prompt = caption_prompt(tokenizer) if task == "caption" else tokenizer.convert_tokens_to_ids(["<emb>"])
    out = []
    for start in range(0, len(rows), batch_size):
        new = model.caption(vectors[rows[start:start + batch_size]].to(device_of(model)), prompt, max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out += [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in new]
    n = len(rows)
    exact = [any(_words(g) == _words(r) for r in refs[row]) for g, row in zip(out, rows, strict=True)]
    f1 = [max(word_f1(g, r) for r in refs[row]) for g, row in zip(out, rows, strict=True)]
    shuffled = [max(word_f1(g, r) for r in refs[rows[(k + 1) % n]]) for k, g in enumerate(out)]
    return {"captions": n, "caption_exact": sum(exact) / n, "caption_word_f1": sum(f1) / n,
            "caption_word_f1_shuffled": sum(shuffled) / n,
            "caption_examples": [{"generated": g, "reference": refs[row][0]} for g, row in zip(out[:5], rows[:5],
                                                                                               strict=True)]}
