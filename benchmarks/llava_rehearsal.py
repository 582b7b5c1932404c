"""LLaVA-1.5-7B stage 2 with LoRA rehearsed on one GPU at the real shapes, random weights:
this project's training loop against TRL's `SFTTrainer`, in tokens/s, model FLOPs
utilisation (MFU) and peak memory, with `mmpeft plan`'s estimate beside the measured peak.

    python benchmarks/llava_rehearsal.py --device cuda          # the 7B shape, bf16
    python benchmarks/llava_rehearsal.py                        # tiny shape, CPU, float32
    python benchmarks/llava_rehearsal.py --device cuda --batch-size 16 --peak-tflops 989

Model: a `LlavaForConditionalGeneration` shaped as LLaVA-1.5-7B (Vicuna-7B / Llama-2-7B,
32,000 tokens plus the image token; CLIP ViT-L/14 at 336 px, layer -2 less the class token,
576 tokens an image; `mlp2x_gelu`), from configs in code, made on `--device` in the
training dtype. `--shape tiny` keeps the structure, small. Trained as the recipe trains it:
LoRA r 128, alpha 256, dropout 0.05 on every linear layer of the LM (not its head), the
connector in full, the tower frozen, sdpa attention, gradient checkpointing. Data:
`--max-length` token ids a sample, one image's placeholders after the first token, the rest
uniform over the text vocabulary, labels on the second half of the text; sample i drawn
from seed i.

Sides, each in its own process, runs interleaved, medians of `--repeats`:
- `mmpeft`: `mmpeft.train.loop.train` (DeepSpeed, `--ds-config`, ZeRO-2 by default), with
  `apply_trainability`, `frozen_modules` and `llava_forward` as `recipes/llava_finetune.py`;
- `trl`: `SFTTrainer` given the same samples tokenized (`skip_prepare_dataset`) and the same
  collate function, LoRA on the same layers (a regex), the connector in `modules_to_save`,
  non-reentrant checkpointing as ours, bf16. Both must train the same parameter count.

Tokens/s counts every position (image tokens too) over the steps after `--warmup-steps`,
each step's end read after `torch.cuda.synchronize()`. Peak memory: `max_memory_allocated`
from the process's start (on CPU its peak resident set, libraries included). MFU: model
FLOPs against the GPU's dense bf16 peak (`PEAK_BF16_TFLOPS`, `--peak-tflops`); none on CPU.

Model FLOPs of a sequence of s tokens (`training_flops`), matrix multiplies only, 2 a
multiply-add (norms, activations, softmax, rotary left out):
- the LM's linear layers, N weights, frozen: 2N forward and 2N backward per token (input
  gradients only: frozen weights get none); LoRA's A and B: 6 N_lora per token;
- attention scores and values: 4 s h per layer per token forward, twice that backward, the
  full-square convention (PaLM, Megatron); a causal kernel does about half of it;
- the LM head, frozen, at every position: 2 V h forward and 2 V h backward per token;
- the tower, frozen, forward only: 2 N_vision per patch position (class token included,
  every layer it runs) and its attention, 4 p h_v per layer and position;
- the connector, trained in full: 6 N per image token.
Checkpointing's recomputation is not counted (model, not hardware, FLOPs); TRL's fused head
scores only labelled positions, yet the same model FLOPs serve both sides.

Micro-batch 4: 8,192 tokens a step make every LM matmul at least 8,192 x 4,096 x 4,096,
enough to keep the tensor cores busy, and the plan puts our side at 24.5 GiB, room for a
40 GB card (LLaVA's own run: 16 a GPU under ZeRO-3). Targets: MFU >= 45% at 2,048 tokens;
1.5x TRL's tokens/s at no more memory.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from llava_vs_trl import LM_LINEAR, _peak
from run_all import cpu_name
from side_by_side import interleaved

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("mmpeft", "trl")
MFU_TARGET, SPEED_TARGET = 0.45, 1.5
LR, WARMUP_RATIO = 2e-4, 0.03
TRAINABLE = {"vision": "frozen", "connector": "full", "llm": "lora"}
LORA_R, LORA_ALPHA, LORA_DROPOUT = 128, 256, 0.05  # LLaVA-1.5's LoRA run
PAD_ID = 0  # Llama's <unk>, the pad token LLaVA gives Vicuna
# published dense (no sparsity) bf16 tensor peaks, TFLOP/s; the first name found in
# torch.cuda.get_device_name() counts, so "H100 PCIe" comes before "H100" (the SXM part)
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("A10G", 70.0))
SHAPES = {
    "7b": {"lm": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096},
           "vision": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "intermediate_size": 4096, "image_size": 336, "patch_size": 14},
           "max_length": 2048, "dtype": "bf16"},
    "tiny": {"lm": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 256},
             "vision": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                        "image_size": 28, "patch_size": 14},
             "max_length": 64, "dtype": "float32"},
}
DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}


def model_configs(shape: str):
    """The LM's `LlamaConfig` (the text vocabulary plus the image token, whose id is the
    last) and the tower's `CLIPVisionConfig` for `shape`."""
    from transformers import CLIPVisionConfig, LlamaConfig

    lm, vision = dict(SHAPES[shape]["lm"]), SHAPES[shape]["vision"]
    lm["vocab_size"] += 1
    return (LlamaConfig(**lm, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=1,
                        eos_token_id=2),
            CLIPVisionConfig(**vision, hidden_act="quick_gelu", layer_norm_eps=1e-5))


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    """The LLaVA of `shape` with seeded random weights, every tensor made on `device` in
    `dtype` (the connector is made there too, then cast), sdpa attention."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from mmpeft.llava.model import build_llava

    lm_config, vision_config = model_configs(shape)
    torch.manual_seed(0)
    with torch.device(device):
        lm = LlamaForCausalLM._from_config(lm_config, dtype=dtype, attn_implementation="sdpa")
        tower = CLIPVisionModel._from_config(vision_config, dtype=dtype, attn_implementation="sdpa")
        model = build_llava(tower, lm, lm_config.vocab_size - 1, "mlp2x_gelu", -2)
    misplaced = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != device.type]
    if misplaced:
        raise RuntimeError(f"not on {device}: {', '.join(misplaced[:5])}")
    return model


def shape_counts(lm_config, vision_config, lora_r: int) -> dict:
    """The sizes `training_flops` takes, counted on models built on the meta device:
    weights of the LM's decoder linear layers and of LoRA (`mmpeft.train.plan`), of the
    tower's linear layers and patch convolution, of the connector's two matrices."""
    from torch import nn
    from transformers import CLIPVisionModel

    from mmpeft.train.plan import lm_sizes, lora_params

    lm = lm_sizes(lm_config)
    with torch.device("meta"):
        tower = CLIPVisionModel(vision_config)
    vision_linear = sum(m.weight.numel() for m in tower.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return {"lm_linear": lm.linear_params, "lm_layers": lm.layers, "lm_hidden": lm.hidden, "vocab": lm.vocab,
            "lora": lora_params(lm, lora_r), "vision_linear": vision_linear,
            "vision_layers": vision_config.num_hidden_layers, "vision_hidden": vision_config.hidden_size,
            "vision_positions": patches + 1, "connector": vision_config.hidden_size * lm.hidden + lm.hidden ** 2,
            "image_tokens": patches}


def training_flops(seq: int, lm_linear: int, lm_layers: int, lm_hidden: int, vocab: int, lora: int,
                   vision_linear: int, vision_layers: int, vision_hidden: int, vision_positions: int,
                   connector: int, image_tokens: int, images: int = 1) -> dict[str, int]:
    """Model FLOPs of one training sequence of `seq` tokens holding `images` images, by
    part, as the module docstring counts them."""
    return {"lm_linear": 4 * lm_linear * seq, "lora": 6 * lora * seq,
            "attention": 3 * 4 * seq * seq * lm_hidden * lm_layers, "lm_head": 4 * vocab * lm_hidden * seq,
            "vision": images * (2 * vision_linear * vision_positions
                                + 4 * vision_positions ** 2 * vision_hidden * vision_layers),
            "connector": images * 6 * connector * image_tokens}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU named `device_name`, None when the table lacks it."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def synthetic_conversations(n: int, length: int, image_tokens: int, image_token_id: int, text_vocab: int,
                            image_size: int):
    """A `datasets.Dataset` of `n` samples of `length` token ids: `image_tokens` image
    placeholders after the first token, then text ids uniform over `[0, text_vocab)`, labels
    on the second half of the text only, and one image's pixel values (a torch tensor when
    read; the ids stay lists, as `collate_conversations` takes them). Sample `i` is drawn
    from seed `i`."""
    import datasets

    rows = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        ids = torch.randint(0, text_vocab, (length,), generator=gen)
        ids[1:1 + image_tokens] = image_token_id
        labels = ids.clone()
        labels[:length - (length - 1 - image_tokens) // 2] = -100
        pixels = torch.randn(1, 3, image_size, image_size, generator=gen)
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "pixel_values": pixels.numpy()})
    ids = datasets.List(datasets.Value("int64"))
    features = datasets.Features({"input_ids": ids, "labels": ids, "pixel_values": datasets.Array4D(
        shape=(1, 3, image_size, image_size), dtype="float32")})
    return datasets.Dataset.from_list(rows, features=features).with_format("torch", columns=["pixel_values"],
                                                                          output_all_columns=True)


def llama_tokenizer():
    """A tokenizer holding only Llama's special tokens (`<unk>` 0, `<s>` 1, `</s>` 2), `<unk>`
    as pad: what `SFTTrainer` reads from one when the data is already tokenized."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")


def _mark(device: str) -> tuple[float, int]:
    """(seconds, peak bytes so far) once the device has finished its queued work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter(), _peak(device)


def run_mmpeft(args, model, data, out: Path) -> dict:
    """The project's loop on `model`, as the LLaVA stage-2 recipe runs it."""
    from mmpeft.data.dataset import collate_conversations
    from mmpeft.llava.model import llava_forward, llava_parts
    from mmpeft.models.trainable import LoraSettings, apply_trainability, frozen_modules, trainable_parameter_count
    from mmpeft.train.loop import TrainConfig, train

    parts = llava_parts(model)
    model = apply_trainability(model, parts, TRAINABLE, LoraSettings(r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT))
    marks = []
    cfg = TrainConfig(output_dir=str(out), max_steps=args.steps, micro_batch_size=args.batch_size, lr=LR,
                      warmup_ratio=WARMUP_RATIO, gradient_checkpointing=True, keep_checkpoints=1,
                      ds_config=args.ds_config, bf16=args.dtype == "bf16")
    history = train(model, data, collate_conversations(PAD_ID), cfg,
                    forward=lambda engine, batch: {"loss": llava_forward(engine, batch).loss},
                    export=lambda folder, is_main: None, lengths=[args.max_length] * len(data),
                    has_image=[True] * len(data), frozen=frozen_modules(parts, TRAINABLE),
                    after_step=lambda engine: marks.append(_mark(args.device)))
    return {"losses": [h["loss"] for h in history], "marks": marks, "trainable": trainable_parameter_count(model)[0]}


def run_trl(args, model, data, out: Path) -> dict:
    """`SFTTrainer` on `model` with the same samples, collate function, LoRA and schedule."""
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from mmpeft.data.dataset import collate_conversations

    marks = []

    class StepEnd(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append(_mark(args.device))

    config = SFTConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP_RATIO,
        weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=args.dtype == "bf16", max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=args.device == "cpu", dataloader_num_workers=0, seed=0)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=LM_LINEAR,
                      modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, data_collator=collate_conversations(PAD_ID),
                         processing_class=llama_tokenizer(), peft_config=lora, callbacks=[StepEnd()])
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    if any("vision_tower" in n for n in trained):
        raise RuntimeError("TRL side: the vision tower trains; the LoRA regex must exclude it")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "marks": marks,
            "trainable": trainable}


def child(args) -> None:
    """One side, in this process; prints its result as a `RESULT {json}` line."""
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if args.device != "cpu" else torch.device("cpu")  # DeepSpeed's LOCAL_RANK 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
        name, memory = torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory
    else:
        name, memory = cpu_name(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    model = build_model(args.shape, device, DTYPES[args.dtype])
    lm_config, vision_config = model_configs(args.shape)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    data = synthetic_conversations(8 * args.batch_size, args.max_length, patches, lm_config.vocab_size - 1,
                                   lm_config.vocab_size - 1, vision_config.image_size)
    with tempfile.TemporaryDirectory(dir=args.work) as out:
        run = run_mmpeft if args.side == "mmpeft" else run_trl
        result = run(args, model, data, Path(out))
    marks = result.pop("marks")
    result.update(times=[t for t, _ in marks], peak_bytes=max(p for _, p in marks), device_name=name,
                  device_memory=memory)
    print("RESULT " + json.dumps(result), flush=True)


def warmup_left_out(steps: int, warmup: int) -> int:
    """How many first steps tokens/s leaves out: `warmup`, but at least one (its start is
    the first step's end) and at most all but two."""
    return max(1, min(warmup, steps - 2))


def tokens_per_second(times: list[float], tokens_per_step: int, warmup: int) -> float:
    """Throughput over the steps after the warm-up, from the times at which steps ended."""
    skip = warmup_left_out(len(times), warmup)
    return tokens_per_step * (len(times) - skip) / (times[-1] - times[skip - 1])


def run_side(side: str, args, work: str) -> dict:
    """`side` in a fresh interpreter; its parsed RESULT line."""
    cmd = [sys.executable, __file__, "--side", side, "--work", work, "--shape", args.shape, "--device", args.device,
           "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--steps", str(args.steps), "--threads", str(args.threads), "--ds-config", args.ds_config]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"side {side!r} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["tokens_per_second"] = tokens_per_second(result["times"], args.batch_size * args.max_length,
                                                    args.warmup_steps)
    print(f"{side}: {result['tokens_per_second']:,.0f} tokens/s, peak {result['peak_bytes'] / 2 ** 20:,.0f} MiB, "
          f"losses {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}", flush=True)
    return result


def plan_estimate(shape: str, args, gpu_memory_gib: float):
    """`mmpeft plan`'s per-GPU estimate for this run's model and settings."""
    from mmpeft.train import plan

    lm_config, vision_config = model_configs(shape)
    lm, vision = plan.lm_sizes(lm_config), plan.vision_sizes(vision_config)
    zero = json.loads(Path(args.ds_config).read_text()).get("zero_optimization", {})
    settings = plan.Settings(
        gpus=1, micro_batch_size=args.batch_size, grad_accum=1, max_length=args.max_length,
        gradient_checkpointing=True, dtype_bytes=2 if args.dtype == "bf16" else 4, zero_stage=zero.get("stage", 0),
        offload_param=False, offload_optimizer=False, qlora=False, lora_r=LORA_R, lora_dropout=LORA_DROPOUT,
        lora_targets="all-linear", trainable=TRAINABLE)
    return plan.memory_plan(lm, vision, plan.connector_params("mlp2x_gelu", vision.hidden, lm.hidden), settings,
                            gpu_memory_gib)


def check_args(args) -> None:
    """Every problem with the settings, raised at once."""
    lm_config, vision_config = model_configs(args.shape)
    image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    problems = [f"--{k.replace('_', '-')} is {getattr(args, k)}; at least {least}"
                for k, least in (("steps", 2), ("repeats", 1), ("batch_size", 1), ("threads", 1))
                if getattr(args, k) < least]
    if not image_tokens + 3 <= args.max_length <= lm_config.max_position_embeddings:
        problems.append(f"--max-length is {args.max_length}; the {args.shape} shape takes {image_tokens + 3} (one "
                        f"image's {image_tokens} tokens, a first token, a question and an answer token) to "
                        f"{lm_config.max_position_embeddings}")
    if args.device not in ("cpu", "cuda", "cuda:0"):
        problems.append(f"--device is {args.device}; cpu or cuda (one process, one GPU: choose it with "
                        "CUDA_VISIBLE_DEVICES, as DeepSpeed's single-process launch takes the first)")
    elif args.device != "cpu" and not torch.cuda.is_available():
        problems.append(f"--device is {args.device} but torch sees no CUDA device")
    if not Path(args.ds_config).is_file():
        problems.append(f"--ds-config {args.ds_config}: no such file")
    if problems:
        raise ValueError("llava_rehearsal: " + "; ".join(problems))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=SHAPES, help="7b on CUDA, tiny on CPU by default")
    p.add_argument("--dtype", choices=DTYPES, help="the shape's own by default: bf16 for 7b, float32 for tiny")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, help="tokens a sequence, image tokens included (7b: 2048)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps a run")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of tokens/s")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for a GPU the table lacks")
    p.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "zero2.json"))
    p.add_argument("--output", default="outputs/benchmarks/llava_rehearsal.json")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child's one side
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("7b" if args.device.startswith("cuda") else "tiny")
    args.dtype = args.dtype or SHAPES[args.shape]["dtype"]
    args.max_length = args.max_length or SHAPES[args.shape]["max_length"]
    if args.side:
        return child(args)
    check_args(args)
    trainable = {}

    def run(side: str) -> dict:  # stops at the first run whose trainable count differs, not after all of them
        result = run_side(side, args, work)
        trainable.setdefault(side, result["trainable"])
        if len(set(trainable.values())) > 1 or trainable[side] != result["trainable"]:
            raise RuntimeError(f"the sides train different parameter counts: {trainable}, now {result['trainable']}")
        return result

    with tempfile.TemporaryDirectory() as work:
        runs = interleaved({side: lambda side=side: run(side) for side in SIDES}, {}, args.repeats)
    report(runs, args)


def report(runs: dict[str, list[dict]], args) -> dict:
    """Print the medians, MFU, memory against the plan, the loss curves and the targets;
    write the JSON to `args.output`."""
    trainable = {side: rs[0]["trainable"] for side, rs in runs.items()}
    lm_config, vision_config = model_configs(args.shape)
    flops_parts = training_flops(args.max_length, **shape_counts(lm_config, vision_config, LORA_R))
    flops_per_token = sum(flops_parts.values()) / args.max_length
    first, cuda = runs["mmpeft"][0], args.device.startswith("cuda")
    peak = (args.peak_tflops or peak_tflops(first["device_name"])) if cuda else None
    speed = {s: statistics.median(r["tokens_per_second"] for r in rs) for s, rs in runs.items()}
    memory = {s: statistics.median(r["peak_bytes"] for r in rs) for s, rs in runs.items()}
    mfu = {s: flops_per_token * v / (peak * 1e12) if peak else None for s, v in speed.items()}
    kind = "peak allocated (torch.cuda.max_memory_allocated)" if cuda else "peak resident set of the process (CPU)"
    print(f"\n{first['device_name']}: {args.shape} shape, {args.dtype}, batch {args.batch_size} x {args.max_length} "
          f"tokens, {args.steps} steps a run (tokens/s from step {warmup_left_out(args.steps, args.warmup_steps) + 1}"
          f" on), {args.repeats} run(s) a side")
    if not cuda:
        print(f"{args.dtype} on CPU: this checks the benchmark end to end; its figures say nothing about a GPU run")
    print(f"model FLOPs a token: {flops_per_token:.4g} (" + ", ".join(
        f"{k} {v / sum(flops_parts.values()):.1%}" for k, v in flops_parts.items()) + "); peak "
        + (f"{peak:g} TFLOP/s" if peak else "unknown (give --peak-tflops)" if cuda else "not applicable on CPU"))
    print(f"memory: {kind}\n\n{'side':>8}  {'tokens/s':>10} (runs)       MFU   peak MiB  trainable")
    for s, rs in runs.items():
        each = ", ".join(f"{r['tokens_per_second']:,.0f}" for r in rs)
        shown = f"{mfu[s]:.1%}" if mfu[s] is not None else "n/a"
        print(f"{s:>8}  {speed[s]:10,.0f} ({each})  {shown:>6}  {memory[s] / 2 ** 20:9,.0f}  {trainable[s]:,}")
    curves = {s: [statistics.mean(x) for x in zip(*(r["losses"] for r in rs), strict=True)] for s, rs in runs.items()}
    print("\nloss, mean over runs, every 5th step:")
    for s, c in curves.items():
        print(f"{s:>8}  " + " ".join(f"{x:.3f}" for x in c[::5]) + f"   last {c[-1]:.3f}")
    plan = plan_estimate(args.shape, args, first["device_memory"] / 2 ** 30)
    # allocated memory holds neither the CUDA context nor allocator slack, the plan's reserve
    planned = plan.gpu_total - plan.gpu["reserve"]
    plan_ratio = memory["mmpeft"] / planned
    print(f"\nmmpeft plan: {plan.gpu_total / 2 ** 30:.2f} GiB per GPU (" + ", ".join(
        f"{k} {v / 2 ** 30:.2f}" for k, v in plan.gpu.items()) + f"), {plan.trainable_params:,} trainable; measured "
        f"{memory['mmpeft'] / 2 ** 30:.2f} GiB, {plan_ratio:.2f}x the plan less its reserve"
        + ("" if cuda else " (the plan is for a GPU; the resident set counts the libraries)"))
    ratio, memory_ratio = speed["mmpeft"] / speed["trl"], memory["mmpeft"] / memory["trl"]
    met_speed = ratio >= SPEED_TARGET and memory_ratio <= 1.0
    met_mfu = None if mfu["mmpeft"] is None else mfu["mmpeft"] >= MFU_TARGET
    mfu_text = ("not applicable on CPU" if not cuda else "no peak known for this GPU" if met_mfu is None
                else f"{mfu['mmpeft']:.1%}, {'met' if met_mfu else 'MISSED'}")
    print(f"MFU target {MFU_TARGET:.0%} at 2,048 tokens (this run {args.max_length}): {mfu_text}")
    print(f"mmpeft / trl: {ratio:.2f}x tokens/s, {memory_ratio:.2f}x peak memory (target {SPEED_TARGET}x at no more "
          f"memory: {'met' if met_speed else 'MISSED'})")
    result = {"device_name": first["device_name"], "runs": runs, "tokens_per_second": speed, "mfu": mfu,
              "peak_tflops": peak, "peak_bytes": memory, "peak_kind": kind, "trainable": trainable,
              "flops_per_token": flops_per_token, "flops_parts_per_sequence": flops_parts, "loss_curves": curves,
              "ratio": ratio, "memory_ratio": memory_ratio,
              "plan": {"gpu": plan.gpu, "total": plan.gpu_total, "trainable": plan.trainable_params,
                       "measured_over_plan_less_reserve": plan_ratio},
              "targets": {"mfu": MFU_TARGET, "speed": SPEED_TARGET}, "met": {"mfu": met_mfu, "speed": met_speed},
              "settings": {**vars(args), "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT},
                           "trainable": TRAINABLE, "gradient_checkpointing": True, "attention": "sdpa"}}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
