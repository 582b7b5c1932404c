"""data_gen's local backend: batched generation against one prompt at a time, same model,
same prompts, same token budget, measured side by side in one process.

    python benchmarks/data_gen_batching.py                 # SmolLM2-135M-Instruct GGUF, CPU
    python benchmarks/data_gen_batching.py --model /models/Qwen2.5-7B-Instruct --device cuda --prompts 64

Greedy decoding with a fixed number of new tokens (no early stop) so both sides generate
exactly the same number of tokens. Runs alternate (batched, single, batched, ...) after a
warm-up, and the median of `--repeats` is reported with the spread.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mmpeft.instruct.backends import Request, Sampling, TransformersBackend, default_gguf
from mmpeft.instruct.prompts import load_prompt

TARGET = 3.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="outputs/benchmarks/data_gen_batching.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompt = load_prompt("conversation")
    requests = [Request(prompt.messages(f"A picture of {n} coloured shapes on a dark background."), 0)
                for n in range(args.prompts)]
    backends = {}
    for name, batch in (("batched", args.batch_size), ("one at a time", 1)):
        b = TransformersBackend(args.model or default_gguf(), Sampling(args.new_tokens, 0.0, 1.0), batch, args.device)
        b.model.generation_config.eos_token_id = None  # every reply runs to the same length
        b.stops = set()
        backends[name] = b

    def tokens_per_second(backend) -> float:
        start = time.perf_counter()
        n = sum(r.completion_tokens for _, r in backend.run(requests))
        return n / (time.perf_counter() - start)

    for b in backends.values():  # warm-up
        list(b.run(requests[:2]))
    runs = {name: [] for name in backends}
    for _ in range(args.repeats):
        for name, b in backends.items():
            runs[name].append(tokens_per_second(b))
    med = {name: statistics.median(v) for name, v in runs.items()}
    ratio = med["batched"] / med["one at a time"]
    for name, v in runs.items():
        print(f"{name:>14}: {med[name]:8.1f} tokens/s (runs {', '.join(f'{x:.1f}' for x in v)})")
    print(f"batched / one at a time: {ratio:.2f}x (target {TARGET}x: {'met' if ratio >= TARGET else 'MISSED'}); "
          f"{args.prompts} prompts, batch {args.batch_size}, {args.new_tokens} new tokens each, {args.threads} "
          f"threads, {args.device}")
    # one decoding step produces `batch` tokens batched and one token alone
    step_batched, step_single = args.batch_size / med["batched"], 1 / med["one at a time"]
    profile = (f"a decoding step for {args.batch_size} prompts takes {step_batched * 1000:.0f} ms, "
               f"{step_batched / step_single:.1f}x the {step_single * 1000:.0f} ms of a step for one: batching "
               "shares the part of a step that does not grow with the batch (reading the weights, the Python and "
               "framework overhead of each layer), and the rest grows with the batch on this device")
    print(profile)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "median": med, "ratio": ratio, "target": TARGET, "met": ratio >= TARGET,
                               "profile": profile, "settings": vars(args)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
