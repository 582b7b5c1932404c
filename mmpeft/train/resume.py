"""Where a run resumes from: its checkpoint folders, the position in the data after a number
of steps, and each rank's random states. A checkpoint resumes only on the rank count that
saved it (`check_resume_world`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint folders of `output_dir` that hold their state file (written last), by step."""
    done = [p for p in Path(output_dir).glob("checkpoint-*") if (p / STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def resume_position(step: int, grad_accum: int, per_epoch: int) -> tuple[int, int]:
    """After `step` optimizer steps: the sampler's epoch and how many of that epoch's micro-batches
    this rank has already trained on (`per_epoch`: its micro-batches per epoch)."""
    micro_done = step * grad_accum
    return micro_done // per_epoch, micro_done % per_epoch


def rng_states() -> dict:
    """This rank's random states: the CPU's and, on an accelerator, its device's (dropout
    masks on a GPU come from the device's generator, not the CPU's)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    device = accelerator.get_rng_state() if accelerator.device_name() != "cpu" else None
    return {"cpu": torch.get_rng_state(), "device": device, "device_name": accelerator.device_name()}


def set_rng_states(saved) -> None:
    """Restore `rng_states()` (a bare tensor: a checkpoint from before device states were kept)."""
    from deepspeed.accelerator import get_accelerator

    if torch.is_tensor(saved):
        torch.set_rng_state(saved)
        return
    torch.set_rng_state(saved["cpu"])
    accelerator = get_accelerator()
    if saved.get("device") is not None and accelerator.device_name() == saved.get("device_name"):
        accelerator.set_rng_state(saved["device"])


def check_resume_world(ckpt: Path, world: int) -> None:
    """Stop before loading a checkpoint that another number of ranks saved: its optimizer
    shards, data positions and random states are per rank, so only the same count resumes
    it exactly. Says which count does."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    saved = state.get("world_size", len(list(ckpt.glob("rng_rank*.pt"))))
    if saved != world:
        raise ValueError(f"{ckpt} was saved by {saved} rank(s) and this run has {world}: resume it with {saved} "
                         f"(e.g. deepspeed --num_gpus {saved} ...), or start a new run from its weights")
