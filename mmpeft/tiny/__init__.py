"""The built-in fixture: the tiny world and the zoo trained on it, built on first use.

A recipe config asks for it with a `fixture:` block (`name: tiny`, and optionally `cache`,
`world_dir`, `zoo_dir`); `{world}` and `{zoo}` in its values are then filled with the
folders. Configs for real models carry no such block and never build it.
"""

from __future__ import annotations

from pathlib import Path

from mmpeft.tiny.world import WorldSpec, build_world
from mmpeft.tiny.zoo import ZooSpec, build_zoo

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


FIXTURES = ("tiny",)


def fixture_problems(config: dict) -> list[str]:
    """What is wrong with a config's `fixture:` block, or with a config that refers to the
    tiny world or zoo (`{world}`, `{zoo}`, `model.preset: tiny`) without asking for it."""
    import yaml

    fixture = config.get("fixture")
    if fixture is None:
        text = yaml.safe_dump(config)
        uses = "{world}" in text or "{zoo}" in text or config.get("model", {}).get("preset") == "tiny"
        return ["the config uses the tiny world or zoo ({world}, {zoo} or model.preset: tiny) but has no "
                "'fixture: {name: tiny}' block"] if uses else []
    if not isinstance(fixture, dict) or fixture.get("name") not in FIXTURES:
        return [f"fixture.name must be one of {', '.join(FIXTURES)}, not {fixture!r}"]
    unknown = sorted(set(fixture) - {"name", "cache", "world_dir", "zoo_dir"})
    return [f"fixture: unknown key(s) {', '.join(unknown)}"] if unknown else []


def folders_for(config: dict, environ: dict) -> tuple[Path | None, Path | None]:
    """The world and zoo folders of a config's `fixture:` block: its `world_dir` and
    `zoo_dir` when both are set, else the default ones under the cache, built by the first
    rank while the others wait. `(None, None)` for a config without the block."""
    import torch.distributed as dist

    fixture = config.get("fixture")
    if not fixture:
        return None, None
    if fixture.get("world_dir") and fixture.get("zoo_dir"):
        return Path(fixture["world_dir"]), Path(fixture["zoo_dir"])
    cache = cache_root(fixture.get("cache"), environ)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if not distributed or dist.get_rank() == 0:
        world_and_zoo(cache)
    if distributed:
        dist.barrier()
    world, zoo, _ = world_and_zoo(cache)
    return world, zoo
