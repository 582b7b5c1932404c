"""What the training-step benchmarks share: their command line, the tiny world and zoo as
the default, one measured pass of training steps, interleaved repeats, and the report."""

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from mmpeft.presets import resolve_preset
from mmpeft.tiny import cache_root, world_and_zoo


def parser(doc: str, batch_size: int, steps: int, output: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default=None, help="caption shards (default: the tiny world's training shards)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--steps", type=int, default=steps, help="steps per measured run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=output)
    return p


def preset_and_data(args):
    """The preset's sources (the tiny zoo's by default) and the caption shards to read."""
    torch.set_num_threads(args.threads)
    zoo = data = None
    if args.preset == "tiny" or args.data is None:
        world, zoo, _ = world_and_zoo(cache_root(None, os.environ))
        data = f"{world}/wds/train/*.tar"
    return resolve_preset(args.preset, zoo_dir=zoo), args.data or data


def training_pass(model, loss: Callable, dataset, collate, batch_size: int, device: str) -> float:
    """Samples per second of one pass over `dataset`: load each batch, forward, backward,
    AdamW step (a fresh optimizer, so both sides start alike)."""
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    start = time.perf_counter()
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return len(dataset) / (time.perf_counter() - start)


def interleaved(sides: dict[str, Callable], warm_up: dict[str, Callable], repeats: int) -> dict[str, list[float]]:
    """Each side once to warm up, then the sides in turn, `repeats` times."""
    for run in warm_up.values():
        run()
    runs = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            runs[name].append(run())
    return runs


def compare(model, loss, datasets: dict, collate, args) -> dict[str, list[float]]:
    """Interleaved training passes over each named dataset (the faster side first)."""
    def side(d):
        return lambda: training_pass(model, loss, d, collate, args.batch_size, args.device)

    return interleaved({n: side(d) for n, d in datasets.items()},
                       {n: side(Subset(d, range(args.batch_size))) for n, d in datasets.items()}, args.repeats)


def report(runs: dict[str, list[float]], target: float, args, profile: str, **extra) -> dict:
    """Print the medians, the ratio of the first side to the second against `target`, and
    `profile`; write the JSON to `args.output`."""
    fast, slow = runs
    med = {name: statistics.median(v) for name, v in runs.items()}
    ratio = med[fast] / med[slow]
    for name, v in runs.items():
        print(f"{name:>20}: {med[name]:8.1f} samples/s (runs {', '.join(f'{x:.1f}' for x in v)})")
    print(f"{fast} / {slow}: {ratio:.2f}x (target {target}x: {'met' if ratio >= target else 'MISSED'}); batch "
          f"{args.batch_size}, {args.steps} steps a run, {args.threads} threads, {args.device}")
    print(profile)
    result = {"runs": runs, "median": med, "ratio": ratio, "target": target, "met": ratio >= target, **extra,
              "settings": vars(args)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result
