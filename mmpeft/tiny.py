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
