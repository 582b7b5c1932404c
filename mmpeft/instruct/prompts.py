"""Task prompts kept as data files (`data_gen/prompts/*.json`, shipped as package data of
`mmpeft.data_gen`): a system message and
few-shot pairs of context and reply. A prompt's version is the hash of its file's bytes,
so every generated record can say exactly which wording produced it."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(str(importlib.resources.files("mmpeft.data_gen") / "prompts"))
TASKS = ("conversation", "detail", "complex_reasoning")


@dataclass(frozen=True)
class TaskPrompt:
    task: str
    system: str
    examples: tuple[tuple[str, str], ...]
    uses_boxes: bool
    version: str

    def messages(self, context: str) -> list[dict]:
        """System message, the few-shot pairs as earlier turns, then this context."""
        out = [{"role": "system", "content": self.system}]
        for ctx, reply in self.examples:
            out += [{"role": "user", "content": ctx}, {"role": "assistant", "content": reply}]
        return out + [{"role": "user", "content": context}]


def load_prompt(task: str, folder: str | Path = PROMPT_DIR) -> TaskPrompt:
    """The prompt file `{folder}/{task}.json`, checked and versioned."""
    path = Path(folder) / f"{task}.json"
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
        examples = tuple((e["context"], e["reply"]) for e in data["examples"])
        prompt = TaskPrompt(data["task"], data["system"], examples, bool(data["uses_boxes"]),
                            hashlib.sha256(raw).hexdigest()[:12])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a prompt file (needs task, system, uses_boxes, examples "
                         f"[{{context, reply}}]): {err}") from err
    if prompt.task != task:
        raise ValueError(f"{path}: says task {prompt.task!r}, expected {task!r}")
    return prompt


def detail_questions(folder: str | Path = PROMPT_DIR) -> list[str]:
    """Paraphrases of 'describe the image in detail', one per line."""
    lines = (Path(folder) / "detail_questions.txt").read_text().splitlines()
    return [q.strip() for q in lines if q.strip()]
