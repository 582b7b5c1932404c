"""The `mmpeft` command: build the tiny world and zoo, and run the whole tiny pipeline.

    mmpeft world      build the tiny world (data) into the cache
    mmpeft zoo        build the world and the tiny model zoo, print the zoo's figures
    mmpeft pipeline   everything on the built-in default (world, zoo, data_gen, LLaVA stages 1
                      and 2), printing each part's figures

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
        ("lm", "test perplexity", lm["test_perplexity"], f"uniform guess {lm['vocab_size']}"),
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


RECIPES = [  # (script, output folder, extra overrides), in the order they build on each other
    ("llava_pretrain.py", "llava_pretrain_tiny", []),
    ("llava_finetune.py", "llava_finetune_tiny", ["model.init_connector={out}/llava_pretrain_tiny"]),
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
    for script, name, extra in RECIPES:
        cmd = [sys.executable, str(repo / "recipes" / script), f"training.output_dir={out / name}",
               f"tiny.cache={cache}", *[e.format(out=out) for e in extra]]
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=repo)
        m = json.loads((out / name / "metrics.json").read_text())
        rows += [(name, "training loss, first -> last step", m["last_loss"], f"first {m['first_loss']:.3f}"),
                 (name, "answer accuracy on held-out questions", m["answer_accuracy_after"],
                  f"before training {m['answer_accuracy_before']:.3f}, chance {m['chance']:.3f}")]
    print_table("Recipes on the tiny preset:", rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmpeft", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["world", "zoo", "pipeline"])
    parser.add_argument("--cache", help="folder for worlds and zoos (default $MMPEFT_CACHE or ~/.cache/mmpeft)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes that train zoo parts side by side")
    parser.add_argument("--output", default="outputs", help="folder for the recipes' runs (pipeline)")
    args = parser.parse_args(argv)
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
    print(f"\ndone in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
