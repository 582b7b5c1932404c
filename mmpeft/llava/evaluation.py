"""LLaVA's held-out figure: greedy answers to checkable questions about each image."""

from __future__ import annotations

import torch

from mmpeft.data.conversation import IMAGE_MARKER, ConversationEncoder, Sample
from mmpeft.eval.answers import before_and_after, image_control, normalise_answer, swapped_images


@torch.no_grad()
def answer_accuracy(model, encoder: ConversationEncoder, rows: list[dict], batch_size: int = 32,
                    max_new_tokens: int = 6) -> dict:
    """Greedy answers to each question about its image; accuracy overall and by question
    type, next to chance (uniform guessing among the answers each type allows)."""
    tokenizer = encoder.tokenizer
    device = next(model.parameters()).device
    correct, by_type, answers = [], {}, []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        samples = [Sample(r["id"], [{"role": "user", "content": f"{IMAGE_MARKER}\n{r['q']}"}], [r["image"]])
                   for r in chunk]
        prompts = [encoder.encode_prompt(s) for s in samples]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, p in enumerate(prompts):  # left padding, so every answer starts at the same column
            ids[k, width - len(p):], mask[k, width - len(p):] = torch.tensor(p), 1
        pixels = torch.cat([encoder.images(s) for s in samples])
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             pixel_values=pixels.to(device, next(model.parameters()).dtype),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        for r, seq in zip(chunk, out[:, width:], strict=True):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            ok = normalise_answer(text) == normalise_answer(r["a"])
            correct.append(ok)
            by_type.setdefault(r["type"], []).append(ok)
            answers.append({"id": r["id"], "q": r["q"], "gold": r["a"], "answer": text.strip()})
    return {
        "accuracy": sum(correct) / len(correct),
        "chance": sum(1 / r["options"] for r in rows) / len(rows),
        "questions": len(rows),
        "by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "examples": answers,
    }


def accuracy_before_training(model, encoder: ConversationEncoder, rows: list[dict], device: torch.device,
                             partitioned: bool, log=print) -> dict | None:
    """`answer_accuracy` of the model before it trains, on `device` (None without `rows`).
    A model whose LM loaded partitioned over the ranks (ZeRO-3) cannot run on one rank
    before the engine starts: then it says so to `log` and returns None."""
    if not rows:
        return None
    if partitioned:
        log("evaluation before training: skipped, as the LM is partitioned over the ranks (ZeRO-3) until it trains")
        return None
    return answer_accuracy(model.to(device), encoder, rows)


def held_out_figures(model, encoder: ConversationEncoder, rows: list[dict], before: dict | None) -> tuple[dict, str]:
    """The figures of a trained model: answer accuracy on the held-out questions, beside the
    accuracy before training (`before`, from `accuracy_before_training`) and the image-swap
    control (`swapped_images`: the same model, each question about another image), with the
    line that reports them. The control needs questions about two images or more."""
    after = answer_accuracy(model, encoder, rows)
    figures, text = before_and_after(before, after)
    if len({str(r["image"]) for r in rows}) > 1:
        control, control_text = image_control(after, answer_accuracy(model, encoder, swapped_images(rows)))
        figures, text = figures | control, f"{text}; {control_text}"
    return figures, text
