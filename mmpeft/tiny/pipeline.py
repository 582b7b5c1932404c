"""The tiny pipeline: data_gen and every recipe on the tiny preset, run as a user runs them
(`python -m mmpeft.recipes.NAME`), and the figures table they add up to.

The table is printed and written next to the runs as `figures.json` (every row, for
scripts), `figures.md` (the printed table in a Markdown page) and `report.html` (the tables
with each run's training plot and links to its sample page and logs), so the docs quote a
file that a rerun replaces rather than prose.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mmpeft.families import FigureRow, family_of


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
    print("\n".join(table_lines(rows)))


def table_lines(rows: list[FigureRow]) -> list[str]:
    """The rows of a figures table, aligned."""
    width, name = max(len(r[1]) for r in rows), max(len(r[0]) for r in rows)
    lines = []
    for part, figure, value, reference in rows:
        shown = f"{value:>8d}" if isinstance(value, int) else f"{value:>8.3f}"
        lines.append(f"  {part:<{name}} {figure:<{width}}  {shown}   ({reference})")
    return lines


def row_records(rows: list[FigureRow]) -> list[dict]:
    """A figures table's rows as JSON objects (part, figure, value, reference)."""
    return [{"part": p, "figure": f, "value": v, "reference": r} for p, f, v, r in rows]


def write_figures(out: Path, tables: dict[str, list[FigureRow]], seconds: float) -> tuple[Path, Path, Path]:
    """`figures.json`, `figures.md` and `report.html` in `out`: each table's rows, with the
    machine and the time the run took; the report adds every run's plot and links."""
    from mmpeft.pages import write_run_report

    out.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version()}
    record = {"seconds": round(seconds, 1), "machine": machine,
              "tables": {title: row_records(rows) for title, rows in tables.items()}}
    (out / "figures.json").write_text(json.dumps(record, indent=1) + "\n")
    written = (f"Written by `mmpeft pipeline` in {seconds / 60:.1f} minutes on {machine['cpus']} CPUs "
               f"({machine['processor']}, {machine['platform']}, Python {machine['python']}).")
    lines = ["# Figures of `mmpeft pipeline`", "", written, ""]
    for title, rows in tables.items():
        lines += [f"{title}", "", "```", *table_lines(rows), "```", ""]
    (out / "figures.md").write_text("\n".join(lines))
    return out / "figures.json", out / "figures.md", write_run_report(out, tables, written.replace("`", ""))


def _run(module: str, args: list[str], env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", module, *args]
    print(f"\n$ python -m {module} {' '.join(args)}", flush=True)
    subprocess.run(cmd, check=True, env=env)


RECIPES = [  # (recipe, output folder, extra overrides), in the order they build on each other
    ("llava_pretrain", "llava_pretrain_tiny", []),
    ("llava_finetune", "llava_finetune_tiny", ["model.init_connector={out}/llava_pretrain_tiny"]),
    # MiniGPT-5 reads context images through the LLaVA connector trained above (as it reuses MiniGPT-4's)
    ("minigpt5_stage1", "minigpt5_stage1_tiny", ["model.init_connector={out}/llava_finetune_tiny"]),
    ("minigpt5_stage2", "minigpt5_stage2_tiny", ["model.init_from={out}/minigpt5_stage1_tiny"]),
    ("gill", "gill_tiny", []),
]


def run_recipes(out: Path, cache: Path, seeds: Sequence[int] = (0,)) -> list[FigureRow]:
    """Run data_gen and each recipe on the tiny preset as a user would; returns their
    figures (each family says which of its metrics are shown). With more than one seed in
    `seeds`, every recipe runs once for each (`training.seed`, into `out/seed{s}/`) and each
    figure is their mean with every seed's value and the spread (`spread_rows`); each seed's
    rows also go to `out/figures_by_seed.json`."""
    rows = []
    data = out / "data_gen" / "llava_instruct.json"
    _run("mmpeft.data_gen.make_llava_instruct", ["--output", str(data), "--no-progress"],
         env={**os.environ, "MMPEFT_CACHE": str(cache)})
    s = json.loads(data.with_name(data.name + ".summary.json").read_text())
    rows.append(("data_gen", f"LLaVA records written of {s['jobs']} asked (SmolLM2-135M teacher)", s["records"],
                 f"rejected replies {sum(s['rejected'].values())}, {s['tokens'] / max(s['seconds'], 1e-9):.1f} "
                 "tokens/s"))
    by_seed = {}
    for seed in seeds:
        runs = out if len(seeds) == 1 else out / f"seed{seed}"
        by_seed[seed] = []
        for recipe, name, extra in RECIPES:
            _run(f"mmpeft.recipes.{recipe}", [f"training.output_dir={runs / name}", f"fixture.cache={cache}",
                                              f"training.seed={seed}", *[e.format(out=runs) for e in extra]])
            metrics = json.loads((runs / name / "metrics.json").read_text())
            by_seed[seed] += family_of(recipe).figures[recipe](name, metrics)
    if len(seeds) > 1:
        (out / "figures_by_seed.json").write_text(json.dumps(
            {str(seed): row_records(seed_rows) for seed, seed_rows in by_seed.items()}, indent=1) + "\n")
    return rows + spread_rows(by_seed)


def spread_rows(by_seed: dict[int, list[FigureRow]]) -> list[FigureRow]:
    """One row for each figure of several recipe seeds' runs: the mean value, and as its
    reference every seed's value, the spread (largest - smallest) and the first seed's own
    reference. One seed's rows come back as they are."""
    seeds = list(by_seed)
    first = by_seed[seeds[0]]
    if len(seeds) == 1:
        return first
    rows = []
    for k, (part, figure, _, reference) in enumerate(first):
        same = [by_seed[s][k] for s in seeds]
        if any(r[:2] != (part, figure) for r in same):
            raise ValueError(f"seed runs disagree on row {k}: {[r[:2] for r in same]}")
        values = [r[2] for r in same]
        shown = ", ".join(f"{v:.3f}" for v in values)
        rows.append((part, figure, sum(values) / len(values),
                     f"seeds {', '.join(map(str, seeds))}: {shown}; spread {max(values) - min(values):.3f}; "
                     f"seed {seeds[0]}: {reference}"))
    return rows


def _llava_stages(suffix: str) -> list:
    stage1 = f"llava_pretrain{suffix}_tiny"
    return [("llava_pretrain", stage1, []),
            ("llava_finetune", f"llava_finetune{suffix}_tiny", [f"model.init_connector={{out}}/{stage1}"])]


# Every connector's last run (stage 2, or Flamingo's one stage) trains this many steps, so the
# comparison holds when one recipe's own default changes (llava_finetune_tiny's is 3,000).
CONNECTOR_STEPS = 1000

CONNECTORS = [  # (name, what it is, [(recipe, config and output folder, overrides)]): same data and questions
    ("mlp2x_gelu", "LLaVA-1.5's MLP, the baseline", _llava_stages("")),
    ("qformer", "BLIP-2's Q-Former", _llava_stages("_qformer")),
    ("perceiver_resampler", "Flamingo's Perceiver Resampler", _llava_stages("_resampler")),
    ("minigpt4", "MiniGPT-4: Q-Former, only its projection trains, LM frozen", _llava_stages("_minigpt4")),
    ("gated_xattn", "Flamingo: resampler + gated cross-attention, LM frozen", [("flamingo", "flamingo_tiny", [])]),
]


def run_connectors(out: Path, cache: Path) -> list[FigureRow]:
    """LLaVA stages 1 and 2 with each connector, and Flamingo's fusion, on the tiny preset;
    returns their held-out answer accuracy next to chance and to the `mlp2x_gelu` baseline."""
    results = {}
    for name, _, runs in CONNECTORS:
        for k, (recipe, run, extra) in enumerate(runs):
            steps = [f"training.max_steps={CONNECTOR_STEPS}"] if k == len(runs) - 1 else []
            _run(f"mmpeft.recipes.{recipe}", ["--config", run, f"training.output_dir={out / run}",
                                              f"fixture.cache={cache}", *[e.format(out=out) for e in extra], *steps])
        results[name] = json.loads((out / runs[-1][1] / "metrics.json").read_text())
    base = results["mlp2x_gelu"]["answer_accuracy_after"]
    return [(name, what, results[name]["answer_accuracy_after"],
             f"chance {results[name]['chance']:.3f}, mlp2x_gelu {base:.3f}") for name, what, _ in CONNECTORS]


ZOO_TITLE = "Tiny zoo, scored on the world's test split:"
RECIPES_TITLE = "Recipes on the tiny preset:"
SEEDS_TITLE = "Recipes on the tiny preset, mean of {n} recipe seeds (each seed's value and the spread follow):"
CONNECTORS_TITLE = "Held-out answer accuracy with each connector (LLaVA stages 1 and 2, or Flamingo):"


def run(command: str, out: Path, cache: Path, zoo_records: dict, started: float, seeds: Sequence[int] = (0,)) -> None:
    """`pipeline` or `connectors` after the world and zoo are built: run, print, write.
    `seeds`: the recipe seeds the pipeline runs (`run_recipes`)."""
    tables = {ZOO_TITLE: zoo_figures(zoo_records)}
    if command == "pipeline":
        title = RECIPES_TITLE if len(seeds) == 1 else SEEDS_TITLE.format(n=len(seeds))
        tables[title] = run_recipes(out, cache, seeds)
    else:
        tables[CONNECTORS_TITLE] = run_connectors(out, cache)
    for title, rows in list(tables.items())[1:]:
        print_table(title, rows)
    for path in write_figures(out, tables, time.time() - started):
        print(f"figures: {path}")
