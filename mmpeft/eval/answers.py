"""Answer accuracy on checkable questions (the world's `eval/{split}_qa.jsonl`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.llava import IMAGE_MARKER, ConversationEncoder, Sample


def normalise_answer(text: str) -> str:
    """Lower case, without surrounding spaces and final punctuation: how answers compare."""
    return text.strip().strip(".!?").strip().lower()


def read_questions(path: str | Path, image_folder: str | Path, limit: int | None = None) -> list[dict]:
    """Rows `{id, image, q, a, type, options}` with the image path made absolute."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for row in rows:
        row["image"] = Path(image_folder) / row["image"]
    return rows[:limit] if limit else rows


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


def before_and_after(before: dict, after: dict) -> tuple[dict, str]:
    """The metrics of `answer_accuracy` run before and after training, and the line that
    reports them."""
    metrics = {"answer_accuracy_before": before["accuracy"], "answer_accuracy_after": after["accuracy"],
               "chance": after["chance"], "by_type_after": after["by_type"]}
    text = (f"answer accuracy on {after['questions']} held-out questions: {before['accuracy']:.3f} before, "
            f"{after['accuracy']:.3f} after (chance {after['chance']:.3f}); by type "
            + ", ".join(f"{k} {v:.2f}" for k, v in after["by_type"].items()))
    return metrics, text
