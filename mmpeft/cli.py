"""The `mmpeft` command: build the tiny world and zoo, and run the whole tiny pipeline.

    mmpeft world      build the tiny world (data) into the cache
    mmpeft zoo        build the world and the tiny model zoo, print the zoo's figures
    mmpeft pipeline   everything on the built-in default (world, zoo, data_gen, LLaVA stages 1
                      and 2, MiniGPT-5 stages 1 and 2, GILL), printing each part's figures
    mmpeft connectors LLaVA stages 1 and 2 with the qformer, perceiver_resampler and MiniGPT-4
                      connectors, and Flamingo's fusion, beside the mlp2x_gelu baseline
    mmpeft push OUTPUT_DIR --repo-id user/name [--private] [--revision R] [--dry-run]
                      push a finished run or checkpoint to the Hub with a model card
    mmpeft export OUTPUT_DIR EXPORT_DIR
                      merge the LoRA into the base and write a standalone checkpoint

The cache is `--cache`, else `$MMPEFT_CACHE`, else `~/.cache/mmpeft`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .tiny import cache_root, world_and_zoo
from .world import WorldSpec, build_world


def zoo_figures(records: dict) -> list[tuple[str, str, float, str]]:
    """Rows of (part, figure, value, reference) for printing."""
    clip, lm, vae, sd = (records[k]["metrics"] for k in ("clip", "lm", "vae", "sd"))
    rows = [
        ("clip", f"image->text recall@1 over {clip['candidates']} test images", clip["image_to_text_r1"],
         f"chance {clip['chance_r1']:.3f}"),
        ("clip", "text->image recall@1", clip["text_to_image_r1"], f"chance {clip['chance_r1']:.3f}"),
        ("lm", f"answer accuracy from a text description ({lm['questions']} questions)", lm["text_qa_accuracy"],
         f"chance {lm['chance']:.3f}"),
        ("lm", "test perplexity on the tokens it learns", lm["test_perplexity"], f"uniform guess {lm['vocab_size']}"),
        ("vae", "test reconstruction MSE", vae["test_reconstruction_mse"],
         f"pixel variance {vae['pixel_variance']:.3f}"),
    ]
    for attr in ("colour", "shape", "where"):
        for g in ("1", "3"):
            rows.append(("sd", f"{attr} right in samples, guidance {g} ({sd['prompts']} captions)",
                         sd[f"guidance_{g}"][attr],
                         f"chance {sd['chance'][attr]:.3f}, true images {sd['true_images'][attr]:.3f}"))
    return rows


def print_table(title: str, rows) -> None:
    """A plain aligned table on stdout."""
    print(f"\n{title}")
    width, name = max(len(r[1]) for r in rows), max(len(r[0]) for r in rows)
    for part, figure, value, reference in rows:
        shown = f"{value:>8d}" if isinstance(value, int) else f"{value:>8.3f}"
        print(f"  {part:<{name}} {figure:<{width}}  {shown}   ({reference})")


def _llava_rows(name: str, m: dict) -> list:
    return [(name, "training loss, first -> last step", m["last_loss"], f"first {m['first_loss']:.3f}"),
            (name, "answer accuracy on held-out questions", m["answer_accuracy_after"],
             f"before training {m['answer_accuracy_before']:.3f}, chance {m['chance']:.3f}")]


def _minigpt5_stage1_rows(name: str, m: dict) -> list:
    return [(name, "training loss, first -> last step", m["loss"], f"first {m['first_loss']:.3f}"),
            (name, "held-out diffusion loss, mapped voken conditioning", m["heldout_diffusion_loss_right"],
             f"shuffled {m['heldout_diffusion_loss_shuffled']:.4f}, gap {m['heldout_diffusion_loss_gap']:.4f} +- "
             f"{m['heldout_diffusion_loss_gap_se']:.4f}")]


def _minigpt5_stage2_rows(name: str, m: dict) -> list:
    return [(name, "training loss, first -> last step", m["loss"], f"first {m['first_loss']:.3f}"),
            (name, f"vokens emitted where an image belongs ({m['stories']} stories)", m["voken_emission_where_image"],
             f"where none belongs {m['voken_emission_where_text']:.2f}"),
            (name, "held-out diffusion loss, mapped voken conditioning", m["diffusion_loss_right"],
             f"shuffled {m['diffusion_loss_shuffled']:.4f}, gap {m['diffusion_loss_gap']:.4f} +- "
             f"{m['diffusion_loss_gap_se']:.4f}"),
            (name, "CLIP similarity, generated vs true last image", m["clip_image_similarity"],
             f"shuffled pairs {m['clip_image_similarity_shuffled']:.3f}, SD given the true caption "
             f"{m['clip_image_similarity_sd_caption']:.3f}"),
            (name, "CLIP text-image similarity with guidance", m["clip_text_similarity_guided"],
             f"without guidance {m['clip_text_similarity_unguided']:.3f}")]


def _gill_rows(name: str, m: dict) -> list:
    return [(name, "training loss, first -> last step", m["loss"], f"first {m['first_loss']:.3f}"),
            (name, f"text-to-image recall@1 from [IMG] tokens ({m['images']} images)", m["recall_at_1"],
             f"tiny CLIP text encoder {m['clip_text_recall_at_1']:.3f}, chance {m['chance_at_1']:.3f}"),
            (name, "text-to-image recall@5 from [IMG] tokens", m["recall_at_5"],
             f"tiny CLIP text encoder {m['clip_text_recall_at_5']:.3f}, chance {m['chance_at_5']:.3f}"),
            (name, f"CLIP similarity, generated vs true image ({m['generated']} captions)", m["clip_image_similarity"],
             f"shuffled pairs {m['clip_image_similarity_shuffled']:.3f}"),
            (name, "retrieve-or-generate decision accuracy", m["decision_accuracy"],
             f"majority class {m['decision_majority']:.3f}"),
            (name, f"story last image, CLIP similarity from captions + images ({m['story_stories']})",
             m["story_captions_images_clip_image_similarity"],
             f"captions only {m['story_captions_clip_image_similarity']:.3f}"),
            (name, "story last image, recall@1 from captions + images", m["story_captions_images_recall_at_1"],
             f"captions only {m['story_captions_recall_at_1']:.3f}, chance {1 / m['story_stories']:.3f}")]


RECIPES = [  # (script, output folder, extra overrides, figures), in the order they build on each other
    ("llava_pretrain.py", "llava_pretrain_tiny", [], _llava_rows),
    ("llava_finetune.py", "llava_finetune_tiny", ["model.init_connector={out}/llava_pretrain_tiny"], _llava_rows),
    # MiniGPT-5 reads context images through the LLaVA connector trained above (as it reuses MiniGPT-4's)
    ("minigpt5_stage1.py", "minigpt5_stage1_tiny", ["model.init_connector={out}/llava_finetune_tiny"],
     _minigpt5_stage1_rows),
    ("minigpt5_stage2.py", "minigpt5_stage2_tiny", ["model.init_from={out}/minigpt5_stage1_tiny"],
     _minigpt5_stage2_rows),
    ("gill.py", "gill_tiny", [], _gill_rows),
]


def run_recipes(out: Path, cache: Path) -> None:
    """Run data_gen and each recipe on the tiny preset as a user would, then print their figures."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "recipes").is_dir():
        raise FileNotFoundError(f"no recipes/ beside the package at {repo}: install from a clone with pip install -e .")
    rows = []
    data = out / "data_gen" / "llava_instruct.json"
    cmd = [sys.executable, str(repo / "data_gen" / "make_llava_instruct.py"), "--output", str(data), "--no-progress"]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=repo, env={**os.environ, "MMPEFT_CACHE": str(cache)})
    s = json.loads(data.with_name(data.name + ".summary.json").read_text())
    rows.append(("data_gen", f"LLaVA records written of {s['jobs']} asked (SmolLM2-135M teacher)", s["records"],
                 f"rejected replies {sum(s['rejected'].values())}, {s['tokens'] / max(s['seconds'], 1e-9):.1f} "
                 "tokens/s"))
    for script, name, extra, figures in RECIPES:
        cmd = [sys.executable, str(repo / "recipes" / script), f"training.output_dir={out / name}",
               f"tiny.cache={cache}", *[e.format(out=out) for e in extra]]
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=repo)
        rows += figures(name, json.loads((out / name / "metrics.json").read_text()))
    print_table("Recipes on the tiny preset:", rows)


def _llava_stages(suffix: str) -> list:
    stage1 = f"llava_pretrain{suffix}_tiny"
    return [("llava_pretrain", stage1, []),
            ("llava_finetune", f"llava_finetune{suffix}_tiny", [f"model.init_connector={{out}}/{stage1}"])]


# Every connector's last run (stage 2, or Flamingo's one stage) trains this many steps, so the
# comparison holds when one recipe's own default changes (llava_finetune_tiny's is 3,000).
CONNECTOR_STEPS = 1000

CONNECTORS = [  # (name, what it is, [(script, config and output folder, overrides)]): same data and questions
    ("mlp2x_gelu", "LLaVA-1.5's MLP, the baseline", _llava_stages("")),
    ("qformer", "BLIP-2's Q-Former", _llava_stages("_qformer")),
    ("perceiver_resampler", "Flamingo's Perceiver Resampler", _llava_stages("_resampler")),
    ("minigpt4", "MiniGPT-4: Q-Former, only its projection trains, LM frozen", _llava_stages("_minigpt4")),
    ("gated_xattn", "Flamingo: resampler + gated cross-attention, LM frozen", [("flamingo", "flamingo_tiny", [])]),
]


def run_connectors(out: Path, cache: Path) -> None:
    """LLaVA stages 1 and 2 with each connector, and Flamingo's fusion, on the tiny preset;
    then their held-out answer accuracy next to chance and to the `mlp2x_gelu` baseline."""
    repo = Path(__file__).resolve().parents[1]
    results = {}
    for name, _, runs in CONNECTORS:
        for k, (script, run, extra) in enumerate(runs):
            steps = [f"training.max_steps={CONNECTOR_STEPS}"] if k == len(runs) - 1 else []
            cmd = [sys.executable, str(repo / "recipes" / f"{script}.py"), "--config",
                   str(repo / "recipes" / "configs" / f"{run}.yaml"), f"training.output_dir={out / run}",
                   f"tiny.cache={cache}", *[e.format(out=out) for e in extra], *steps]
            print(f"\n$ {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, cwd=repo)
        results[name] = json.loads((out / runs[-1][1] / "metrics.json").read_text())
    base = results["mlp2x_gelu"]["answer_accuracy_after"]
    print_table("Held-out answer accuracy with each connector (LLaVA stages 1 and 2, or Flamingo):", [
        (name, what, results[name]["answer_accuracy_after"],
         f"chance {results[name]['chance']:.3f}, mlp2x_gelu {base:.3f}") for name, what, _ in CONNECTORS])


def _push(args) -> int:
    from .hub import PushError, push

    try:
        push(args.folder, args.repo_id, private=args.private, revision=args.revision, license=args.license,
             datasets=args.dataset, dry_run=args.dry_run)
    except (PushError, FileNotFoundError, ValueError) as e:
        print(f"mmpeft push: {e}", file=sys.stderr)
        return 1
    return 0


def _export(args) -> int:
    from .export import export_run

    out = export_run(args.folder, args.out, lm=args.lm, clip=args.clip)
    print(f"exported {args.folder} to {out}")
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
    args = parser.parse_args(argv)
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
    print_table("Tiny zoo, scored on the world's test split:", zoo_figures(records))
    if args.command == "pipeline":
        run_recipes(Path(args.output), cache)
    if args.command == "connectors":
        run_connectors(Path(args.output), cache)
    print(f"\ndone in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
