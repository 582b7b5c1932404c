"""GILL's retrieve-or-generate decision: the head is fitted alone on frozen `[IMG0]` states
after the LM part has trained, as GILL trains it on its own labelled prompts."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def coverage_labels(images, covered) -> torch.Tensor:
    """How the tiny world labels the decision: 0 (retrieve) for a prompt whose own image the
    index holds (`covered(image)`), 1 (generate) for one the index has no image for. The
    head learns what the index covers from the prompts alone."""
    return torch.tensor([0 if covered(im) else 1 for im in images])



def train_decision(model, states: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 1e-2) -> float:
    """Fit the decision head alone on `[IMG0]` states (full batch, AdamW, cross entropy);
    returns the last loss."""
    optim = torch.optim.AdamW(model.decision.parameters(), lr=lr, weight_decay=0.0)
    model.decision.train()
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
    pred = model.decision_logits(states).argmax(-1)
    majority = max(labels.float().mean().item(), 1 - labels.float().mean().item())
    return {"decision_accuracy": (pred == labels).float().mean().item(), "decision_majority": majority,
            "decision_retrieve_share": 1 - labels.float().mean().item()}
