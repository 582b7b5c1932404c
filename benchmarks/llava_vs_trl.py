"""LLaVA stage 2 with LoRA: this project's recipe against TRL's `SFTTrainer` training the
same transformers-native `LlavaForConditionalGeneration` on the same conversations, with
the same batch, sequence budget, learning rate, schedule and LoRA, each side in a process
of its own, runs interleaved.

    python benchmarks/llava_vs_trl.py                   # tiny preset, tiny world, CPU
    python benchmarks/llava_vs_trl.py --steps 40 --repeats 5

Sides:
- `mmpeft`: `recipes/llava_finetune.py` as users run it (frozen tower's features cached);
- `mmpeft, no feature cache`: the same recipe with `data.feature_cache=null`;
- `trl`: `SFTTrainer` given the processor, a `messages` + `images` dataset made from the
  same LLaVA JSON and `assistant_only_loss`; LoRA on the LM's linear layers (a regex keeps
  it off the vision tower and the connector), the connector trained in full
  (`modules_to_save`). TRL's defaults of gradient checkpointing and bf16 are turned off,
  so that both sides do the same arithmetic.

Samples per second come from the step times after the first step (start-up, loading and
the first step's allocations are left out). Peak memory is the side's process peak: the
resident set on CPU (it counts the libraries each side imports), allocated memory on GPU.
Both loss curves are printed. Target: at least 1.3x TRL's throughput at no more memory.
"""

import argparse
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.3
SIDES = ("mmpeft", "mmpeft, no feature cache", "trl")
LM_LINEAR = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"  # the LM's linear layers, not its head


def list_content_template(template: str) -> str:
    """A chat template that renders message content given as a list of `{"type": "image"}`
    and `{"type": "text"}` parts (what TRL hands the processor) exactly as the string form
    with `<image>` markers that the recipe renders."""
    loop, content = "{% for message in messages %}", "message['content']"
    if loop not in template or content not in template:
        raise ValueError("the chat template has no plain loop over messages reading message['content']")
    flatten = ("{% set ns = namespace(text='') %}{% if message['content'] is string %}"
               "{% set ns.text = message['content'] %}{% else %}{% for part in message['content'] %}"
               "{% set ns.text = ns.text + ('<image>' if part['type'] == 'image' else part['text']) %}"
               "{% endfor %}{% endif %}")
    return template.replace(content, "ns.text").replace(loop, loop + flatten, 1)


def as_messages(sample) -> dict:
    """A recipe `Sample` as a TRL vision row: content parts split at the `<image>` markers."""
    messages = []
    for m in sample.messages:
        parts = []
        for k, text in enumerate(m["content"].split("<image>")):
            if k:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        messages.append({"role": m["role"], "content": parts})
    return {"messages": messages, "images": [str(p) for p in sample.images]}


def _peak(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_mmpeft(args, out: Path, cached: bool) -> dict:
    """The recipe, in this process, with the benchmark's step budget and no evaluation."""
    recipe = importlib.import_module("mmpeft.recipes.llava_finetune")
    features = str(out.parent / "vision_features") if cached else "null"
    recipe.main(["model.init_connector=null", "eval.questions=null", f"training.output_dir={out}",
                 f"training.max_steps={args.steps}", f"training.micro_batch_size={args.batch_size}",
                 f"training.lr={args.lr}", f"training.lr_by_part.multi_modal_projector={args.lr}",
                 f"data.max_length={args.max_length}", f"data.feature_cache={features}", "training.log_steps=1000",
                 f"threads={args.threads}"])
    history = json.loads((out / f"checkpoint-{args.steps}" / "trainer_state.json").read_text())["history"]
    return {"losses": [h["loss"] for h in history], "seconds": [h["seconds"] for h in history]}


def run_trl(args, world: Path, out: Path) -> dict:
    """TRL's `SFTTrainer` on the same model, data and hyperparameters."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from mmpeft.data.readers import read_llava_json
    from mmpeft.data.templates import chat_template
    from mmpeft.llava.model import add_image_token, build_llava, llava_processor, load_base_models
    from mmpeft.presets import resolve_preset
    from mmpeft.tiny import cache_root, world_and_zoo

    torch.set_num_threads(args.threads)
    _, zoo, _ = world_and_zoo(cache_root(None, os.environ))
    lm, tokenizer, vision, image_processor = load_base_models(resolve_preset(args.preset, zoo_dir=zoo))
    image_token_id = add_image_token(tokenizer, lm)
    torch.manual_seed(0)
    model = build_llava(vision, lm, image_token_id, "mlp2x_gelu", -2)
    processor = llava_processor(image_processor, tokenizer, vision.config)
    processor.chat_template = list_content_template(chat_template(tokenizer, "tokenizer"))
    rows = [as_messages(s) for s in read_llava_json(world / "llava" / "train.json", world / "coco")]
    data = datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.time())

    config = SFTConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.03,
        weight_decay=0.0, max_grad_norm=1.0, max_length=args.max_length, assistant_only_loss=True,
        gradient_checkpointing=False, bf16=False, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=args.device == "cpu", dataloader_num_workers=0, seed=0)
    lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=LM_LINEAR,
                      modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=processor, peft_config=lora,
                         callbacks=[StepTimes()])
    for name, p in trainer.model.named_parameters():
        if p.requires_grad and "vision_tower" in name:
            raise RuntimeError(f"TRL side: the vision tower trains ({name}); the LoRA regex must exclude it")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    start = times[0] - 1  # only differences between steps are used
    # where a step's time goes: reading a batch's rows (image decoding) and collating them
    # (chat template, tokenization, image preprocessing), as the trainer does in its process
    begin = time.perf_counter()
    for k in range(3):
        trainer.data_collator([data[k * args.batch_size + i] for i in range(args.batch_size)])
    batch_seconds = (time.perf_counter() - begin) / 3
    return {"losses": losses, "seconds": [t - start for t in times], "trainable": trainable,
            "batch_seconds": batch_seconds}


def child(args) -> None:
    out = Path(args.work) / re.sub(r"\W+", "_", args.side)
    world = Path(args.world)
    if args.side == "trl":
        result = run_trl(args, world, out)
    else:
        result = run_mmpeft(args, out, cached=args.side == "mmpeft")
    result["peak_bytes"] = _peak(args.device)
    print("RESULT " + json.dumps(result))


def samples_per_second(result: dict, batch: int) -> float:
    s = result["seconds"]
    return batch * (len(s) - 1) / (s[-1] - s[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per measured run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="outputs/benchmarks/llava_vs_trl.json")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child's one side
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--world", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        return child(args)

    from mmpeft.tiny import cache_root, world_and_zoo

    world, _, _ = world_and_zoo(cache_root(None, os.environ))
    runs = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as work:
        def run(side):
            cmd = [sys.executable, __file__, "--side", side, "--work", work, "--world", str(world)] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("side", "work", "world", "output", "repeats")]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM":
                                                                           "false"})
            if proc.returncode:
                raise RuntimeError(f"side {side!r} failed:\n{proc.stderr[-4000:]}")
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
            result = json.loads(line.removeprefix("RESULT "))
            logged = re.search(r"([\d,]+) trainable", proc.stdout)  # the recipe's own count
            result.setdefault("trainable", int(logged.group(1).replace(",", "")) if logged else None)
            return result

        run("mmpeft")  # warm-up: builds the feature cache the cached side reads, and the page cache
        for k in range(args.repeats):
            for side in SIDES:
                runs[side].append(run(side))
                print(f"run {k + 1}, {side}: {samples_per_second(runs[side][-1], args.batch_size):.1f} samples/s, "
                      f"peak {runs[side][-1]['peak_bytes'] / 2 ** 20:.0f} MiB", flush=True)
    speed = {s: statistics.median(samples_per_second(r, args.batch_size) for r in rs) for s, rs in runs.items()}
    peak = {s: statistics.median(r["peak_bytes"] for r in rs) for s, rs in runs.items()}
    curves = {s: [statistics.mean(x) for x in zip(*(r["losses"] for r in rs), strict=True)] for s, rs in runs.items()}
    print(f"\n{'side':>26}  samples/s (runs)                 peak MiB  trainable")
    for s, rs in runs.items():
        print(f"{s:>26}  {speed[s]:6.1f} ({', '.join(f'{samples_per_second(r, args.batch_size):.1f}' for r in rs)})"
              f"   {peak[s] / 2 ** 20:8.0f}  {rs[0]['trainable'] or '-'}")
    tail = max(1, args.steps // 4)
    print("\nloss, mean over runs, every 5th step:")
    for s, c in curves.items():
        shown = " ".join(f"{x:.3f}" for x in c[::5])
        print(f"{s:>26}  {shown}   last {tail} steps {statistics.mean(c[-tail:]):.3f}")
    ratio, ratio_uncached = speed["mmpeft"] / speed["trl"], speed["mmpeft, no feature cache"] / speed["trl"]
    memory = peak["mmpeft"] / peak["trl"]
    met = ratio >= TARGET and memory <= 1.0
    print(f"\nmmpeft / trl: {ratio:.2f}x samples/s, {memory:.2f}x peak memory (target {TARGET}x at no more memory: "
          f"{'met' if met else 'MISSED'}); without the feature cache {ratio_uncached:.2f}x; batch {args.batch_size}, "
          f"max length {args.max_length}, {args.steps} steps a run, {args.threads} threads, {args.device}")
    trl_step = args.batch_size / speed["trl"]
    trl_batch = statistics.median(r["batch_seconds"] for r in runs["trl"])
    profile = (f"TRL: a step takes {trl_step:.2f} s, of which {trl_batch:.2f} s ({trl_batch / trl_step:.0%}) is "
               "reading and collating the batch (chat template, tokenization, image preprocessing) in the training "
               "process; the recipe encodes each conversation once and, with the cache, reads the tower's "
               "features instead of running it")
    print(profile)
    last = {s: statistics.mean(c[-tail:]) for s, c in curves.items()}
    print(f"loss over the last {tail} steps: trl {last['trl']:.3f}, mmpeft {last['mmpeft']:.3f} "
          f"({last['mmpeft'] / last['trl'] - 1:+.1%})")
    result = {"runs": runs, "samples_per_second": speed, "peak_bytes": peak, "ratio": ratio,
              "ratio_without_feature_cache": ratio_uncached, "memory_ratio": memory, "target": TARGET, "met": met,
              "loss_curves": curves, "profile": profile,
              "settings": vars(args)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
