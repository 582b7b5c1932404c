"""Every benchmark, one after another, then one JSON of their results, a PNG chart of the
ratios against their targets and the Markdown table docs/benchmarks.md carries.

    python benchmarks/run_all.py                 # tiny preset, tiny world, CPU
    python benchmarks/run_all.py --threads 1     # passed on to every benchmark
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
# (script, what it compares, the ratio's key, the target (None: no target), how the ratio reads)
CASES = [
    ("llava_vs_trl.py", "LLaVA stage 2 LoRA: this recipe / TRL's SFTTrainer, same model, data and batch", "ratio", 1.3,
     "samples/s"),
    ("llava_feature_cache.py", "LLaVA stage 1: cached vision features / tower every step", "ratio", 3.0,
     "samples/s"),
    ("minigpt5_target_cache.py", "MiniGPT-5 stage 1: cached VAE latents and caption encodings / encoded every step",
     "ratio", 1.5, "samples/s"),
    ("qlora_memory.py", "QLoRA / LoRA peak memory, SmolLM2-135M (lower is better)", "peak_ratio", None, "memory"),
    ("data_gen_batching.py", "data_gen local backend: batches of 8 / one prompt at a time", "ratio", 3.0,
     "tokens/s"),
    ("data_gen_http.py", "data_gen HTTP backend, llama.cpp server: 8 requests in flight / one at a time", "ratio",
     3.0, "tokens/s"),
]


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def chart(rows: list[dict], path: Path) -> None:
    """Horizontal bars of each ratio, with its target as a tick, drawn with Pillow."""
    width, bar, left = 900, 34, 360
    img = Image.new("RGB", (width, 60 + bar * 2 * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    top = max([r["ratio"] for r in rows] + [r["target"] or 0 for r in rows]) * 1.1
    scale = (width - left - 40) / top
    for k, r in enumerate(rows):
        y = 20 + k * bar * 2
        draw.text((10, y + 8), r["script"].removesuffix(".py"), fill="black")
        met = r["target"] is None or r["ratio"] >= r["target"]
        draw.rectangle([left, y, left + r["ratio"] * scale, y + bar], fill=(70, 130, 180) if met else (200, 80, 60))
        draw.text((left + r["ratio"] * scale + 6, y + 8), f"{r['ratio']:.2f}x", fill="black")
        if r["target"]:
            x = left + r["target"] * scale
            draw.line([x, y - 4, x, y + bar + 4], fill="black", width=2)
    x1 = left + scale
    draw.line([x1, 10, x1, img.height - 30], fill=(150, 150, 150))
    draw.text((10, img.height - 20), "grey line: 1x; black ticks: targets; red: target missed", fill="black")
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="outputs/benchmarks")
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for script, what, key, target, unit in CASES:
        result = out / script.replace(".py", ".json")
        print(f"\n$ python benchmarks/{script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), "--threads", str(args.threads), "--output", str(result)],
                       check=True)
        data = json.loads(result.read_text())
        met = None if target is None else data.get("met", data[key] >= target)  # a case may add conditions
        rows.append({"script": script, "compares": what, "ratio": data[key], "target": target, "met": met,
                     "unit": unit, "memory_ratio": data.get("memory_ratio")})
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} threads"
    (out / "summary.json").write_text(json.dumps({"machine": machine, "cases": rows}, indent=1) + "\n")
    chart(rows, out / "summary.png")
    print("\n| benchmark | compares | ratio | target |\n| --- | --- | --- | --- |")
    for r in rows:
        verdict = "" if r["target"] is None else f"{r['target']}x: {'met' if r['met'] else 'missed'}"
        memory = f", peak memory {r['memory_ratio']:.2f}x" if r["memory_ratio"] is not None else ""
        print(f"| `{r['script']}` | {r['compares']} ({r['unit']}) | {r['ratio']:.2f}x{memory} | {verdict} |")
    print(f"\n{machine}; results in {out}/summary.json, chart in {out}/summary.png")


if __name__ == "__main__":
    main()
