"""What every recipe does first: read its command line and config, check that a push at
the end could start, join the process group, and find the fixture the config asks for."""

from __future__ import annotations

from pathlib import Path


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
    parser.add_argument("--config", default=str(default_config),
                        help="a YAML file, or the name of a shipped config (e.g. llava_finetune_7b)")
    parser.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest'")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("--push_to_hub", action="store_true", help="push the output folder to the Hub at the end")
    parser.add_argument("--hub_model_id", help="user/name to push to")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = parser.parse_args(argv)
    push_to = (args.hub_model_id or "") if args.push_to_hub else None
    args.config = str(config_file(args.config, Path(default_config).parent))
    return (args, *start_run(args.config, args.overrides, environ, push_to=push_to))


def config_file(value: str, shipped: Path) -> Path:
    """`value` as a path when it names a file, else the shipped config of that name in
    `shipped` (`llava_finetune_7b` or `llava_finetune_7b.yaml`)."""
    path = Path(value)
    if path.is_file():
        return path
    named = shipped / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and named.is_file():
        return named
    names = ", ".join(sorted(p.stem for p in shipped.glob("*.yaml")))
    raise FileNotFoundError(f"--config {value}: no such file, nor a shipped config of that name ({names})")


def ds_config_file(value: str | None, config_path: str | Path) -> str | None:
    """`training.ds_config` as a file that exists: the path as given (from the current
    folder, or absolute), else beside the recipe config, else the copy shipped in
    `mmpeft.ds_configs` of the same name (`ds_configs/zero3.json` from any folder)."""
    import importlib.resources

    if not value:
        return value
    shipped = Path(str(importlib.resources.files("mmpeft.ds_configs")))
    tried = [Path(value), Path(config_path).parent / value, shipped / Path(value).name]
    for path in tried:
        if path.is_file():
            return str(path)
    raise FileNotFoundError(f"{config_path}: training.ds_config {value} not found; tried "
                            + ", ".join(map(str, tried)))


def start_run(config_path: str, overrides: list[str], environ: dict, push_to: str | None = None):
    """What every recipe does first: read the config with its `dotted.key=value`
    overrides, check that a push at the end could start (`push_to`, a repo id), join the
    process group (one process under plain `python`), set the thread count, warn when bf16 is
    asked of a CPU without bfloat16 kernels (`slow_bf16_warning`), find or build
    the fixture's world and zoo when the config asks for them and fill `{world}` / `{zoo}` into it.
    Returns `(config, zoo folder or None, rank, log)`, where `log` prints on the first
    rank only."""
    import torch

    from mmpeft.config import fill, load_config
    from mmpeft.hub import check_push_ready
    from mmpeft.tiny import fixture_problems, folders_for
    from mmpeft.train.loop import setup_distributed
    from mmpeft.train.placement import slow_bf16_warning

    cfg = load_config(config_path, overrides)
    problems = fixture_problems(cfg)
    if problems:
        raise ValueError(f"{config_path}: " + "; ".join(problems))
    if "training" in cfg and "ds_config" in cfg["training"]:
        cfg["training"]["ds_config"] = ds_config_file(cfg["training"]["ds_config"], config_path)
    if push_to is not None:
        check_push_ready(push_to)
    rank, _ = setup_distributed()
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    log = print if rank == 0 else (lambda *_: None)
    warning = slow_bf16_warning(cfg.get("training", {}), torch.cuda.is_available())
    if warning:
        log(warning)
    world, zoo = folders_for(cfg, environ)
    return fill(cfg, world=world, zoo=zoo), zoo, rank, log


def run_recipe(main, argv: list[str] | None = None) -> None:
    """A recipe's `main(argv)`, where a bad training record (`BadRecord`, raised on every
    rank alike while the data is prepared) ends the run with one line on the first rank,
    naming the record, the reason and the option that skips such records, and exit status 1,
    rather than a traceback from every rank."""
    import os
    import sys

    from mmpeft.data.conversation import BadRecord

    try:
        main(argv)
    except BadRecord as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}; data.skip_bad_records=true leaves such records out and counts them",
                  file=sys.stderr)
        raise SystemExit(1) from None
