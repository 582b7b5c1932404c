"""The training loop's collectives, checked against the device the run trains on.

NCCL, the GPU backend, reduces only tensors on the GPU, and gloo only tensors on the CPU: a
tensor made without a device lands on the CPU and stops a multi-GPU run at its first
collective, while a one-GPU run never reaches the collective and never shows it. Each call
here takes the training device (the engine's) and refuses a tensor that is elsewhere, and it
goes through the process group whenever there is one, with one rank as with eight, so that
the CPU tests take the path a cluster takes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether `a` and `b` are one device (`cuda` and `cuda:0` are, on device 0)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None) != (b.index is None):
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def all_reduce(tensor: torch.Tensor, device: torch.device, mean: bool = False) -> torch.Tensor:
    """Sum (or average, with `mean`) `tensor` over every rank, in place, and return it.
    `device`: the device the run trains on; a tensor on another device is an error naming
    both, raised on every rank alike, before any collective starts."""
    if not same_device(tensor.device, device):
        raise RuntimeError(f"collective on a tensor on {tensor.device}, but the run trains on {device}: "
                           "make the tensor on the training device (NCCL reduces GPU tensors only)")
    if dist.is_initialized():
        dist.all_reduce(tensor)
        if mean:
            tensor /= dist.get_world_size()
    return tensor
