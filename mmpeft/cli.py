"""The `mmpeft` command: build the tiny world and zoo, and run the whole tiny pipeline.

    mmpeft world      build the tiny world (data) into the cache
    mmpeft zoo        build the world and the tiny model zoo, print the zoo's figures
    mmpeft pipeline   everything on the built-in default (world, zoo, data_gen, LLaVA stages 1
                      and 2, MiniGPT-5 stages 1 and 2, GILL), printing each part's figures and
                      writing them to OUTPUT/figures.json and OUTPUT/figures.md;
                      --recipe-seeds 0 1 2 runs each recipe once per seed and gives every
                      figure's mean, each seed's value and the spread
    mmpeft connectors LLaVA stages 1 and 2 with the qformer, perceiver_resampler and MiniGPT-4
                      connectors, and Flamingo's fusion, beside the mlp2x_gelu baseline
    mmpeft push OUTPUT_DIR --repo-id user/name [--private] [--revision R] [--dry-run]
                      push a finished run or checkpoint to the Hub with a model card
    mmpeft export OUTPUT_DIR EXPORT_DIR
                      merge the LoRA into the base and write a standalone checkpoint
    mmpeft standins [--full-size]
                      build the stand-ins of the real models (Vicuna-7B v1.5, CLIP ViT-L/14 at
                      336 and 224 px, llava-1.5-7b-hf, Stable Diffusion 2.1-base, 2.1 (v) and
                      1.5: Hub layouts, real configs cut in depth and width, random weights,
                      real tokenizers) into CACHE/standins/ (--full-size: real sizes, into
                      CACHE/standins/full-size/) and print their folders
    mmpeft plan CONFIG [key=value ...] --gpus N --gpu-memory GIB [--lm-config P] [--clip-config P]
                [--diffusion-config P]
                      the per-GPU memory plan of a LLaVA, MiniGPT-5 or GILL recipe config (a
                      file or a shipped config's name), read from the models' configs only; if
                      it does not fit, the settings that would

The cache is `--cache`, else `$MMPEFT_CACHE`, else `~/.cache/mmpeft`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mmpeft.tiny import cache_root, world_and_zoo
from mmpeft.tiny.pipeline import ZOO_TITLE, print_table, run, zoo_figures
from mmpeft.tiny.world import WorldSpec, build_world


def _push(args) -> int:
    from mmpeft.hub import PushError, push

    try:
        push(args.folder, args.repo_id, private=args.private, revision=args.revision, license=args.license,
             datasets=args.dataset, dry_run=args.dry_run)
    except (PushError, FileNotFoundError, ValueError) as e:
        print(f"mmpeft push: {e}", file=sys.stderr)
        return 1
    return 0


def _export(args) -> int:
    from mmpeft.export import export_run

    out = export_run(args.folder, args.out, lm=args.lm, clip=args.clip)
    print(f"exported {args.folder} to {out}")
    return 0


def _family(model: dict) -> str | None:
    """Which family a config is for, by the model sections each has: a mapper and a retrieval
    head (GILL), a mapper and a connector (MiniGPT-5), a connector alone (LLaVA)."""
    if "mapper" in model:
        return "gill" if "retrieval_dim" in model else "minigpt5" if "connector" in model else None
    return "llava" if "connector" in model else None


def _read_config(part: str, source: str | None):
    from transformers import AutoConfig

    if not source:
        raise ValueError("the preset names none")
    if part != "diffusion":
        return AutoConfig.from_pretrained(source)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return (UNet2DConditionModel.load_config(source, subfolder="unet"),
            AutoencoderKL.load_config(source, subfolder="vae"),
            AutoConfig.from_pretrained(source, subfolder="text_encoder"))


def _plan(args) -> int:
    import importlib.resources
    import json

    from mmpeft.config import load_config
    from mmpeft.families import families
    from mmpeft.presets import resolve_preset
    from mmpeft.start import config_file, ds_config_file
    from mmpeft.train import plan, plan_parts

    path = config_file(args.config, Path(str(importlib.resources.files("mmpeft.recipes"))) / "configs")
    cfg = load_config(path, args.overrides)
    m, t, data = cfg["model"], cfg["training"], cfg["data"]
    recipe = _family(m)
    if recipe is None:
        print(f"mmpeft plan: {path} is no LLaVA (model.connector), MiniGPT-5 (model.connector and model.mapper) or "
              "GILL (model.mapper and model.retrieval_dim) config", file=sys.stderr)
        return 1
    preset = resolve_preset(m["preset"], zoo_dir="<zoo>", lm=m.get("lm_path"), clip=m.get("clip_path"),
                            diffusion=m.get("diffusion_path"))
    sources = {"lm": args.lm_config or preset.lm, "clip": args.clip_config or preset.clip}
    if recipe != "llava":
        sources["diffusion"] = args.diffusion_config or preset.diffusion
    configs = {}
    for part, source in sources.items():
        try:
            configs[part] = _read_config(part, source)
        except (OSError, ValueError) as err:
            what = ("a Stable Diffusion folder with unet/, vae/ and text_encoder/ configs" if part == "diffusion"
                    else "a config.json or a folder")
            print(f"mmpeft plan: cannot read the {part} config from {source} ({err}); offline, give "
                  f"--{part}-config ({what}) or model.{part}_path=<local folder>", file=sys.stderr)
            return 1
    ds = json.loads(Path(ds_config_file(t["ds_config"], path)).read_text()) if t.get("ds_config") else {}
    zero = ds.get("zero_optimization", {})
    lm, vision = plan.lm_sizes(configs["lm"]), plan.vision_sizes(configs["clip"])
    lora = m.get("lora", {})  # a stage that trains no LoRA (LLaVA's stage 1) has none
    targets = lora.get("targets", "all-linear")
    settings = plan.Settings(
        gpus=args.gpus, micro_batch_size=t["micro_batch_size"], grad_accum=t["grad_accum"],
        max_length=data["max_length"], gradient_checkpointing=bool(t.get("gradient_checkpointing")),
        dtype_bytes=2 if t.get("bf16") or t.get("fp16") else 4, zero_stage=zero.get("stage", 0),
        offload_param=zero.get("offload_param", {}).get("device", "none") != "none",
        offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") != "none",
        qlora=bool(m.get("qlora")), lora_r=lora.get("r", 0), lora_dropout=lora.get("dropout", 0.0),
        lora_targets=targets if targets == "all-linear" else tuple(targets), trainable=m["trainable"],
        new_token_rows=m.get("n_vokens", 0),  # the vokens' ([IMG]) rows of the embeddings and head train
        eager_attention=m.get("attn_implementation") == "eager")
    plan_family = families()[recipe].plan_parts
    if plan_family is None:
        parts, connector = None, plan.connector_params(m["connector"], vision.hidden, lm.hidden)
    else:  # what the family's run holds besides a LLaVA-style model
        parts, vision, connector = plan_family(lm, vision, plan_parts.diffusion_sizes(*configs["diffusion"]), m, data)
    result = plan.memory_plan(lm, vision, connector, settings, args.gpu_memory, parts)
    if parts is None:
        print(f"{path}: LM {sources['lm']}, vision {sources['clip']} ({vision.image_tokens} tokens per image, "
              "counted in data.max_length)")
    else:
        print(f"{path}: {parts.recipe}; LM {sources['lm']}, CLIP {sources['clip']}, Stable Diffusion "
              f"{sources['diffusion']}")
        print(plan_parts.describe_parts(parts, lm, vision, connector, settings))
    print(plan.describe(result, args.samples))
    options = [] if result.fits else plan.suggestions(lm, vision, connector, settings, args.gpu_memory, parts)
    if not result.fits and not options:
        print("  no setting the plan knows (checkpointing, ZeRO-3, qlora, offload, a smaller micro batch) fits")
    for option in options:
        print(f"  fits with {' '.join(plan.overrides(settings, option.settings))} "
              f"({option.gpu_total / plan.GIB:.1f} GiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmpeft", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("world", "build the tiny world"), ("zoo", "build the tiny world and zoo"),
                       ("pipeline", "run the whole tiny pipeline"),
                       ("connectors", "LLaVA's stages with each connector, against the mlp2x_gelu baseline")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--cache", help="folder for worlds and zoos (default $MMPEFT_CACHE or ~/.cache/mmpeft)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--workers", type=int, default=2, help="processes that train zoo parts side by side")
        sub.add_argument("--output", default="outputs", help="folder for the recipes' runs (pipeline, connectors)")
        if name == "pipeline":
            sub.add_argument("--recipe-seeds", type=int, nargs="+", default=[0], metavar="SEED",
                             help="run every recipe once per seed (training.seed) into OUTPUT/seedN/; the table "
                                  "gives each figure's mean, every seed's value and the spread")
    sub = commands.add_parser("push", help="push a run or checkpoint folder to the Hugging Face Hub")
    sub.add_argument("folder")
    sub.add_argument("--repo-id", required=True, help="user/name or org/name")
    sub.add_argument("--private", action="store_true")
    sub.add_argument("--revision", help="branch to push to (created if missing)")
    sub.add_argument("--license", default="other", help="the card's license (the base models' terms apply)")
    sub.add_argument("--dataset", action="append", help="a Hub dataset id the run trained on (repeatable)")
    sub.add_argument("--dry-run", action="store_true", help="list every file and its size; contact nothing")
    sub = commands.add_parser("export", help="merge LoRA into the base and write a standalone checkpoint")
    sub.add_argument("folder")
    sub.add_argument("out")
    for part in ("lm", "clip"):
        sub.add_argument(f"--{part}", help=f"a local copy of the {part} base (default: the source the run recorded)")
    sub = commands.add_parser("standins", help="build small stand-ins of the real models' Hub repositories (LLaVA-1.5, "
                              "CLIP ViT-L/14, Stable Diffusion 2.1 and 1.5), print the folders")
    sub.add_argument("--cache", help="default $MMPEFT_CACHE or ~/.cache/mmpeft; folders go to CACHE/standins/")
    sub.add_argument("--full-size", action="store_true", help="keep the real depth and width (about 50 GB)")
    sub = commands.add_parser("plan", help="a recipe config's memory per GPU, before anything loads")
    sub.add_argument("config", help="a YAML file, or the name of a shipped config (e.g. llava_finetune_7b)")
    sub.add_argument("overrides", nargs="*", help="dotted.key=value, as the recipes take them")
    sub.add_argument("--gpus", type=int, default=1)
    sub.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU (80 for an 80 GB A100 or H100)")
    sub.add_argument("--lm-config", help="the LM's config.json or folder, in place of the config's source")
    sub.add_argument("--clip-config", help="CLIP's config.json or folder, in place of the config's source")
    sub.add_argument("--diffusion-config", help="a Stable Diffusion folder (unet/, vae/, text_encoder/ configs), in "
                     "place of the config's source (MiniGPT-5, GILL)")
    sub.add_argument("--samples", type=int, help="training samples, for the steps per epoch")
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    if args.command == "standins":
        from mmpeft.standins.build import build_standins, standin_root

        root = standin_root(args.cache) / ("full-size" if args.full_size else "")  # neither build replaces the other
        for name, folder in build_standins(root, args.full_size, args.cache).items():
            print(f"{name}: {folder}")
        return 0
    if args.command == "push":
        return _push(args)
    if args.command == "export":
        return _export(args)
    cache = cache_root(args.cache, os.environ)
    start = time.time()
    if args.command == "world":
        spec = WorldSpec(seed=args.seed)
        path = build_world(cache / f"world-v{spec.version}-seed{args.seed}", spec)
        print(f"tiny world: {path} ({'/'.join(map(str, spec.images))} images, "
              f"{'/'.join(map(str, spec.stories))} stories, train/val/test)")
        return 0
    world, zoo, records = world_and_zoo(cache, args.seed, args.workers)
    print(f"tiny world: {world}\ntiny zoo:   {zoo}")
    print_table(ZOO_TITLE, zoo_figures(records))
    if args.command in ("pipeline", "connectors"):
        run(args.command, Path(args.output), cache, records, start, getattr(args, "recipe_seeds", [0]))
    print(f"\ndone in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
