"""The built-in default: the tiny world and the zoo trained on it, built on first use."""

from __future__ import annotations

from pathlib import Path

from .world import WorldSpec, build_world
from .zoo import ZooSpec, build_zoo

CACHE_ENV = "MMPEFT_CACHE"


def cache_root(cache: str | None, environ: dict) -> Path:
    """`cache` if given, else the folder named by `$MMPEFT_CACHE` in `environ`, else
    `~/.cache/mmpeft`."""
    return Path(cache or environ.get(CACHE_ENV) or Path.home() / ".cache" / "mmpeft")


def tiny_world(cache: str | Path, seed: int = 0) -> Path:
    """Build (or find) only the default tiny world; returns its folder."""
    spec = WorldSpec(seed=seed)
    return build_world(Path(cache) / f"world-v{spec.version}-seed{seed}", spec)


def world_and_zoo(cache: str | Path, seed: int = 0, workers: int = 2) -> tuple[Path, Path, dict]:
    """Build (or find) the default tiny world and zoo; returns their folders and the zoo's
    per-part records."""
    world_spec, zoo_spec = WorldSpec(seed=seed), ZooSpec(seed=seed)
    world = build_world(Path(cache) / f"world-v{world_spec.version}-seed{seed}", world_spec)
    zoo = Path(cache) / f"zoo-v{zoo_spec.version}-seed{seed}"
    return world, zoo, build_zoo(zoo, world, zoo_spec, workers=workers)


def folders_for(config: dict, environ: dict) -> tuple[Path | None, Path | None]:
    """The world and zoo folders a recipe config refers to: its `tiny.world_dir` and
    `tiny.zoo_dir` when both are set, else the default ones under the cache, built by the
    first rank while the others wait. `(None, None)` when the config needs neither."""
    import torch.distributed as dist

    from .config import needs_tiny_world

    tiny = config.get("tiny", {})
    if tiny.get("world_dir") and tiny.get("zoo_dir"):
        return Path(tiny["world_dir"]), Path(tiny["zoo_dir"])
    if not needs_tiny_world(config):
        return None, None
    cache = cache_root(tiny.get("cache"), environ)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if not distributed or dist.get_rank() == 0:
        world_and_zoo(cache)
    if distributed:
        dist.barrier()
    world, zoo, _ = world_and_zoo(cache)
    return world, zoo


def launch_record(script: str, argv: list[str] | None) -> dict:
    """How a run was started, for its model card: the script (relative to the current
    folder when inside it), its arguments (`argv`, else the process's) and the rank count."""
    import sys

    import torch.distributed as dist

    path = Path(script).resolve()
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    return {"argv": [str(shown), *args], "world_size": dist.get_world_size() if dist.is_initialized() else 1}


def start_recipe(doc: str, default_config: str | Path, argv: list[str] | None, environ: dict):
    """A training recipe's command line read (`--config`, `--resume`, `--push_to_hub
    --hub_model_id`, `dotted.key=value` overrides; deepspeed's `--local_rank` accepted) and
    `start_run` done. Returns `(args, config, zoo folder or None, rank, log)`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--config", default=str(default_config))
    parser.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest'")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("--push_to_hub", action="store_true", help="push the output folder to the Hub at the end")
    parser.add_argument("--hub_model_id", help="user/name to push to")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = parser.parse_args(argv)
    push_to = (args.hub_model_id or "") if args.push_to_hub else None
    return (args, *start_run(args.config, args.overrides, environ, push_to=push_to))


def start_run(config_path: str, overrides: list[str], environ: dict, push_to: str | None = None):
    """What every recipe does first: read the config with its `dotted.key=value`
    overrides, check that a push at the end could start (`push_to`, a repo id), join the
    process group (one process under plain `python`), set the thread count, find or build
    the tiny world and zoo when the config needs them and fill `{world}` / `{zoo}` into it.
    Returns `(config, zoo folder or None, rank, log)`, where `log` prints on the first
    rank only."""
    import torch

    from .config import fill, load_config
    from .hub import check_push_ready
    from .train.loop import setup_distributed

    cfg = load_config(config_path, overrides)
    if push_to is not None:
        check_push_ready(push_to)
    rank, _ = setup_distributed()
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    world, zoo = folders_for(cfg, environ)
    return fill(cfg, world=world, zoo=zoo), zoo, rank, (print if rank == 0 else (lambda *_: None))
