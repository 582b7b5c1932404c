"""GILL's retrieve-or-generate decision: the head is fitted alone on frozen `[IMG0]` states
after the LM part has trained, as GILL trains it on its own labelled prompts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
import torch.nn.functional as F

DECISIONS = ("retrieve", "generate")  # the head's classes 0 and 1


def coverage_labels(images, covered) -> torch.Tensor:
    """How the tiny world labels the decision: 0 (retrieve) for a prompt whose own image the
    index holds (`covered(image)`), 1 (generate) for one the index has no image for. The
    head learns what the index covers from the prompts alone."""
    return torch.tensor([0 if covered(im) else 1 for im in images])


def read_decision_prompts(path: str | Path) -> tuple[list[str], torch.Tensor]:
    """Prompts labelled by people with the answer they preferred, as GILL trains its head
    (on PartiPrompts annotations): `(prompts, labels)`, label 0 retrieve, 1 generate.

    `.jsonl`: one object a line, `{"prompt": "...", "decision": "retrieve" | "generate"}`.
    `.tsv` / `.csv`: a header row naming a `prompt` and a `decision` column (any case,
    other columns ignored). A row without a prompt, or with another decision, is an error
    naming the file and line."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from e
    elif path.suffix in (".tsv", ".csv"):
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            fields = {name.lower(): name for name in reader.fieldnames or []}
            if not {"prompt", "decision"} <= set(fields):
                raise ValueError(f"{path}: the header must name a prompt and a decision column, it has "
                                 f"{reader.fieldnames}")
            rows = [(n, {k: row[fields[k]] for k in ("prompt", "decision")}) for n, row in enumerate(reader, 2)]
    else:
        raise ValueError(f"{path}: decision prompts are read from .jsonl, .tsv or .csv files")
    prompts, labels, problems = [], [], []
    for n, row in rows:
        prompt, decision = row.get("prompt"), str(row.get("decision", "")).strip().lower()
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"line {n}: no prompt")
        elif decision not in DECISIONS:
            problems.append(f"line {n}: decision {row.get('decision')!r} is not retrieve or generate")
        else:
            prompts.append(prompt.strip())
            labels.append(DECISIONS.index(decision))
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems[:10])}" + (f" (and {len(problems) - 10} more)"
                                                                  if len(problems) > 10 else ""))
    if not prompts:
        raise ValueError(f"{path}: no labelled prompts")
    return prompts, torch.tensor(labels)


def train_decision(model, states: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 1e-2) -> float:
    """Fit the decision head alone on `[IMG0]` states (full batch, AdamW, cross entropy);
    returns the last loss. GILL: AdamW at 1e-3 for 2,000 steps."""
    optim = torch.optim.AdamW(model.decision.parameters(), lr=lr, weight_decay=0.0)
    model.decision.train()
    labels = labels.to(states.device)
    for _ in range(steps):
        loss = F.cross_entropy(model.decision_logits(states.detach()), labels)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    model.decision.eval()
    return loss.item()


@torch.no_grad()
def decision_figures(model, states: torch.Tensor, labels: torch.Tensor) -> dict:
    """Decision accuracy on held-out prompts next to always answering the majority class."""
    pred = model.decision_logits(states).argmax(-1).cpu()
    majority = max(labels.float().mean().item(), 1 - labels.float().mean().item())
    return {"decision_accuracy": (pred == labels).float().mean().item(), "decision_majority": majority,
            "decision_retrieve_share": 1 - labels.float().mean().item()}
