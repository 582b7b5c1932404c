"""Retrieval metrics over a score matrix."""

from __future__ import annotations

import torch


def recall(scores: torch.Tensor, truth: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of rows whose true column is among the top k scores."""
    top = scores.topk(max(ks), dim=-1).indices
    truth = truth.to(top.device)
    return {k: (top[:, :k] == truth[:, None]).any(-1).float().mean().item() for k in ks}
