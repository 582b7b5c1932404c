"""Tiny causal LM: `LlamaForCausalLM` from a config in code, trained on the world's text.

Its corpus is captions, stories and text-only chats (a scene described in words, then
questions about it), so it arrives at the LLaVA recipes already able to chat and to answer
from a description, as a real instruction-tuned LLM would. Plain text is learned whole;
chats only on the assistant's turns, as instruction tuning does: the scene descriptions
are random draws, and predicting them would take most of the loss away from the answers.
"""

from __future__ import annotations

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from mmpeft.eval.answers import normalise_answer


def tiny_lm_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """4 layers, 128 wide, grouped-query attention, untied output head (as LLaMA / Vicuna)."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


CHAT_LOSSES = ("answers", "all")


def encode_corpus(tokenizer: PreTrainedTokenizerBase, rows: list[dict],
                  chat_loss: str = "answers") -> list[tuple[list[int], list[int]]]:
    """Token ids of each row and which of them are learned (1) or only read (0): plain
    `text` rows end with EOS and are learned whole; `messages` rows go through the chat
    template, and with `chat_loss="answers"` only the assistant's tokens (the template's
    `{% generation %}` markers) are learned, with `"all"` every token."""
    if chat_loss not in CHAT_LOSSES:
        raise ValueError(f"chat_loss must be one of {CHAT_LOSSES}, got {chat_loss!r}")
    out = []
    for row in rows:
        if "messages" in row:
            enc = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            if not any(enc["assistant_masks"]):
                raise ValueError(f"LM chat row has no assistant turn: {row['messages'][:1]}")
            learned = enc["assistant_masks"] if chat_loss == "answers" else [1] * len(enc["input_ids"])
            out.append((enc["input_ids"], learned))
        else:
            ids = tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
            out.append((ids, [1] * len(ids)))
    return out


def batch_tensors(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 where not learned)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (seq, learned) in enumerate(batch):
        seq, learned = torch.tensor(seq), torch.tensor(learned, dtype=torch.bool)
        ids[i, :len(seq)], attention[i, :len(seq)] = seq, 1
        labels[i, :len(seq)] = seq.masked_fill(~learned, -100)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def train_lm(model: LlamaForCausalLM, sequences: list[tuple[list[int], list[int]]], pad_id: int, steps: int,
             batch_size: int = 32, lr: float = 2e-3, seed: int = 0, log=print) -> list[float]:
    """Next-token loss on the learned tokens of `encode_corpus`'s sequences. Returns every
    step's loss."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(optim, max(1, steps // 20), steps)
    # batches of similar length waste less compute on padding
    by_length = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    chunks = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    losses = []
    model.train()
    for step in range(steps):
        if step % len(chunks) == 0:
            rng.shuffle(chunks)
        loss = model(**batch_tensors([sequences[i] for i in chunks[step % len(chunks)]], pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"lm step {step}/{steps} loss {loss.item():.4f}")
    model.eval()
    return losses


@torch.no_grad()
def answer(model, tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_new_tokens: int = 8) -> str:
    """Greedy reply to a chat, decoded without special tokens."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def text_qa_accuracy(model, tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> dict:
    """Accuracy of the first answer of each held-out text-only chat, next to chance
    (uniform guessing among the answers each question type allows)."""
    correct, chance = 0, 0.0
    for row in rows:
        first_user, gold = row["messages"][0], row["messages"][1]["content"]
        correct += normalise_answer(answer(model, tokenizer, [first_user])) == normalise_answer(gold)
        chance += 1 / row["options"]
    return {"text_qa_accuracy": correct / len(rows), "chance": chance / len(rows), "questions": len(rows)}
