"""The training loop every recipe shares: DeepSpeed engine, grouped batches, checkpoints
that resume exactly.

The model's forward returns the loss and its parts; this loop only optimizes, logs and
saves. It runs the same under `deepspeed`, `torchrun` and plain `python` (one process).
The modules a recipe names as frozen run in eval mode throughout (`train_mode`): their
dropout stays off while the trained parts' dropout (LoRA's, say) works; under gradient
checkpointing those without dropout stay in train mode, where transformers checkpoints
them (`mmpeft.train.modes`).

A checkpoint `checkpoint-{step}/` holds the engine state (trainable weights, optimizer,
scheduler, `ds/`), each rank's RNG state, `training.png`, `trainer_state.json` (written
last: a folder without it is incomplete and ignored), and whatever the recipe's `export`
writes there (adapter, connector, processor, config), so every checkpoint also loads for
inference. What a run shows and logs as it goes (bar or lines, `metrics.jsonl`, TensorBoard,
wandb, MLflow) is in `mmpeft.train.reporting`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mmpeft.train.collectives import all_reduce
from mmpeft.train.modes import enable_gradient_checkpointing, parts_in_eval, train_mode
from mmpeft.train.placement import match_partitioned_dtype, rank_device
from mmpeft.train.reporting import (
    RunReport,
    Throughput,
    chosen_reporters,
    grad_norm_entry,
    gradient_norm,
    memory_used,
    part_learning_rates,
    progress_bar_wanted,
)
from mmpeft.train.resume import (
    STATE_FILE,
    check_resume_world,
    complete_checkpoints,
    latest_checkpoint,
    resume_position,
    rng_states,
    set_rng_states,
)
from mmpeft.train.sampler import GroupedBatchSampler


@dataclass
class TrainConfig:
    """What the loop needs; the recipe's YAML holds these under `training:`."""

    output_dir: str
    max_steps: int
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    lr_by_part: dict[str, float] = field(default_factory=dict)  # name fragment -> learning rate
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)  # GILL: (0.9, 0.95)
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # after the warmup, decay to zero: cosine (LLaVA) or linear (MiniGPT-5)
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False  # recompute activations in backward: far less memory, ~1/3 more compute
    seed: int = 0
    save_steps: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_steps: int = 10
    report_to: str | list[str] = "auto"  # tensorboard, wandb, mlflow, a list, none; auto: tensorboard if installed
    ds_config: str | None = "ds_configs/zero2.json"
    bf16: bool = False
    fp16: bool = False  # for GPUs without bf16 (V100, T4): float16 with DeepSpeed's dynamic loss scaling
    group_by_modality: bool = True
    num_workers: int = 0


def setup_distributed() -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns `(rank, world_size)`."""
    import deepspeed

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python`: a group of one
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    use_rank_device()
    return dist.get_rank(), dist.get_world_size()


def use_rank_device(cuda=torch.cuda) -> torch.device:
    """Make this rank's GPU (`rank_device`) the current CUDA device, and return it (the CPU
    without CUDA). NCCL's object collectives and barriers run on the current device: left
    at cuda:0, every rank of a machine would gather on one GPU before the engine starts (the
    data preparation and cache builds do)."""
    device = rank_device(cuda=cuda.is_available())
    if device.type == "cuda":
        cuda.set_device(device)
    return device


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The JSON config at `cfg.ds_config` (ZeRO stage 0 when None) with the values that the
    training settings own filled in: batch sizes, accumulation, clipping and precision. In the
    file each of them is `"auto"`, absent, or equal to what the training settings give; any
    other value is an error, all of them reported at once, since DeepSpeed would train with it
    while the recipe's YAML says otherwise. `"auto"` ZeRO bucket sizes get fixed defaults.
    Optimizer and scheduler sections pass through untouched; DeepSpeed ignores them, as the
    loop hands it its own AdamW and schedule."""
    source = cfg.ds_config or "the default DeepSpeed config"
    base = json.loads(Path(cfg.ds_config).read_text()) if cfg.ds_config else {"zero_optimization": {"stage": 0}}
    micro, accum = cfg.micro_batch_size, cfg.grad_accum
    batch = micro * accum * world_size
    owned = {  # key (dotted: section.key) -> (value, the training setting it comes from)
        "train_micro_batch_size_per_gpu": (micro, f"training.micro_batch_size is {micro}"),
        "gradient_accumulation_steps": (accum, f"training.grad_accum is {accum}"),
        "train_batch_size": (batch, f"training.micro_batch_size x training.grad_accum x world size is "
                                    f"{micro} x {accum} x {world_size} = {batch}"),
        "gradient_clipping": (cfg.max_grad_norm, f"training.max_grad_norm is {json.dumps(cfg.max_grad_norm)}"),
        "bf16.enabled": (cfg.bf16, f"training.bf16 is {json.dumps(cfg.bf16)}"),
        "fp16.enabled": (cfg.fp16, f"training.fp16 is {json.dumps(cfg.fp16)}"),
    }
    problems = [p for p in [_precision_problem(cfg.bf16, cfg.fp16)] if p]
    for name, (value, setting) in owned.items():
        *section, key = name.split(".")
        where = base.setdefault(section[0], {}) if section else base
        found = where.get(key, "auto")
        if found != "auto" and found != value:
            problems.append(f"{source}: {name} is {json.dumps(found)} but {setting}; "
                            'set it to "auto" or make them agree')
        where[key] = value
    if problems:
        raise ValueError("the DeepSpeed config disagrees with the training settings:\n" + "\n".join(problems))
    zero = base.get("zero_optimization", {})
    for key, value in list(zero.items()):
        if value == "auto":
            zero[key] = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
                         "stage3_param_persistence_threshold": 1e5}.get(key, value)
    base.setdefault("steps_per_print", 10**9)
    return base


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters grouped by learning rate (first matching `lr_by_part` fragment)
    and by weight decay (none for biases, norms and other 1-D parameters)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = next((v for k, v in cfg.lr_by_part.items() if k in name), cfg.lr)
        decay = 0.0 if p.ndim < 2 else cfg.weight_decay
        groups.setdefault((lr, decay), []).append(p)
    if not groups:
        raise ValueError("no parameter is trainable: check the trainability settings")
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


SCHEDULES = ("cosine", "linear")


def _schedule(cfg: TrainConfig):
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"training.schedule is {cfg.schedule!r}; one of {', '.join(SCHEDULES)}")
    warmup = max(1, round(cfg.max_steps * cfg.warmup_ratio)) if cfg.warmup_ratio > 0 else 0

    def factor(step: int) -> float:  # linear warmup, then cosine or linear decay to zero
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress

    return factor


def _precision_problem(bf16, fp16) -> str | None:
    return "training.bf16 and training.fp16 are both true; choose one" if bf16 and fp16 else None


def training_dtype(training: dict) -> torch.dtype:
    """The dtype a recipe loads its models in for the `training:` settings it is given:
    bfloat16 with `bf16`, float16 with `fp16`, else float32."""
    problem = _precision_problem(training.get("bf16"), training.get("fp16"))
    if problem:
        raise ValueError(problem)
    return torch.bfloat16 if training.get("bf16") else torch.float16 if training.get("fp16") else torch.float32


def offloads_optimizer(ds_config: dict) -> bool:
    """Whether a (filled) DeepSpeed config keeps the optimizer states on the CPU or NVMe."""
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def _optimizer_and_schedule(model: torch.nn.Module, cfg: TrainConfig, offload: bool = False):
    """AdamW over `param_groups` and its learning-rate schedule, one scheduler step per
    optimizer step. With the optimizer offloaded (`offload`), DeepSpeed's CPU AdamW, the same
    update, since DeepSpeed refuses torch's there (and it would be slow); its kernel is
    compiled on first use."""
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        raise ValueError(f"training.adam_betas is {list(cfg.adam_betas)}; two numbers in [0, 1), such as [0.9, 0.999]")
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                     adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.adam_betas))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))


def _tokens_per_micro_batch(micro: list[dict], world: int, device: torch.device) -> torch.Tensor | None:
    """Label tokens of the whole step (every micro-batch on every rank) over the number of
    micro-batches. A causal LM's loss divided by this, rather than by its own micro-batch's
    count, makes the step's gradient the mean over all of the step's tokens, as DeepSpeed
    averages over ranks and accumulation steps: the loss curve is the same on 1 or N ranks
    and with any accumulation. None when the batches carry no labels. `device`: the
    training device, where the count is summed over ranks."""
    if not all("labels" in b for b in micro):
        return None
    count = sum((b["labels"][..., 1:] != -100).sum() for b in micro).to(device=device, dtype=torch.float64)
    all_reduce(count, device)
    return (count / (world * len(micro))).clamp(min=1.0).float()


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each logged value averaged over the ranks, reduced on the training `device`."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    all_reduce(t, device, mean=True)
    return dict(zip(keys, t.tolist(), strict=True))


def train(model: torch.nn.Module, dataset, collate: Callable, cfg: TrainConfig,
          forward: Callable[[torch.nn.Module, dict], dict], export: Callable[[Path, bool], None],
          lengths: list[int], has_image: list[bool], resume: str | None = None,
          log: Callable[[str], None] = print, frozen: Sequence[torch.nn.Module] = (),
          after_step: Callable[[torch.nn.Module], None] | None = None, run_config: dict | None = None) -> list[dict]:
    """Train for `cfg.max_steps` optimizer steps and return the history (one dict per
    step: loss, its parts, learning rate). `forward(engine, batch)` returns a dict with
    `loss` and any named parts; `export(folder, is_main)` writes the inference files.
    `resume`: a checkpoint folder, or `latest` for the newest in `output_dir`. `frozen`:
    modules kept in eval mode while the rest trains (`train_mode`), set again before every
    step so that an export or evaluation in between cannot leave them otherwise;
    `mmpeft.models.trainable.frozen_modules` gives a recipe's frozen parts. `after_step(engine)`
    runs after every optimizer step (GILL renormalises its `[IMG]` rows there). `run_config`:
    the settings the reporters record (a recipe's whole config; the training settings when
    None). Progress shows as a bar on a terminal, else as `log` lines (`mmpeft.train.reporting`)."""
    import deepspeed

    reporters = chosen_reporters(cfg.report_to)  # on every rank, before any collective: all stop alike
    rank, world = setup_distributed()
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        turned_on = enable_gradient_checkpointing(model)
        if not turned_on:
            raise ValueError("training.gradient_checkpointing is true but the model holds no transformers or "
                             "diffusers model that supports it")
        if rank == 0:
            log(f"gradient checkpointing: {', '.join(turned_on)}")
    in_eval = parts_in_eval(frozen, cfg.gradient_checkpointing)
    ds_config = deepspeed_config(cfg, world)
    match_partitioned_dtype(model, torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None)
    optimizer, scheduler = _optimizer_and_schedule(model, cfg, offloads_optimizer(ds_config))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    sampler = GroupedBatchSampler(lengths, has_image, cfg.micro_batch_size, world, rank, cfg.grad_accum, cfg.seed,
                                  cfg.group_by_modality)
    # its own generator: making an iterator must not draw from the global RNG that dropout uses,
    # or a resumed run would see other dropout masks than an uninterrupted one
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed))
    per_epoch = len(sampler)
    step, history = 0, []
    ckpt = latest_checkpoint(out) if resume == "latest" else Path(resume) if resume else None
    if ckpt is not None:
        check_resume_world(ckpt, world)
        engine.load_checkpoint(str(ckpt / "ds"), tag="state", load_module_strict=False)
        state = json.loads((ckpt / STATE_FILE).read_text())
        step, history = state["step"], state["history"]
        set_rng_states(torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=True))
        log(f"resumed from {ckpt} at step {step}")
    epoch, skip = resume_position(step, cfg.grad_accum, per_epoch)
    sampler.set_epoch(epoch, skip)
    batches = iter(loader)
    if rank == 0 and sampler.repeated:
        log(f"{sampler.repeated} sample(s) repeated to fill the last batch of each modality")
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    trainable, part_lrs = [p for _, p in named], part_learning_rates([n for n, _ in named], cfg.lr_by_part)
    report = RunReport(out, reporters, rank == 0, cfg.max_steps, cfg.log_steps, step, run_config or asdict(cfg), log,
                       sys.stdout if progress_bar_wanted(sys.stdout) else None, part_lrs, cfg.lr)
    start, device = time.time(), engine.device
    speed = Throughput(cfg.micro_batch_size * cfg.grad_accum * world, device)
    with report:  # an error closes the reporters, marking the run failed
        while step < cfg.max_steps:
            train_mode(engine, in_eval)
            due, own_norm = report.due(step + 1), None
            sums: dict[str, float] = {}
            micro = []
            for _ in range(cfg.grad_accum):
                try:
                    batch = next(batches)
                except StopIteration:
                    epoch += 1
                    sampler.set_epoch(epoch)
                    batches = iter(loader)
                    batch = next(batches)
                micro.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            tokens = _tokens_per_micro_batch(micro, world, device)
            for i, batch in enumerate(micro):
                if tokens is not None:
                    batch["num_items_in_batch"] = tokens
                parts = forward(engine, batch)
                loss = parts["loss"]
                if not loss.requires_grad:
                    # the batch reaches no trainable weight (text only, with only the connector training):
                    # it still passes through backward and step with zero gradients, as the other ranks do
                    loss = loss + sum(0.0 * p.sum() for p in trainable)
                engine.backward(loss)
                if due and i == len(micro) - 1:
                    own_norm = gradient_norm(trainable)  # before the step clips; None under ZeRO
                engine.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if after_step is not None:
                after_step(engine)
            step += 1
            speed.add(micro)
            factor = scheduler.get_last_lr()[0] / scheduler.base_lrs[0]
            # seconds: wall time since this process started training (benchmarks read step times from it)
            record = {"step": step, **_mean_over_ranks(sums, device), "lr": cfg.lr * factor,
                      "seconds": time.time() - start}
            history.append(record)
            report.advance(record)
            if due:  # on every rank: the token count is summed over them
                norm = grad_norm_entry(engine.get_global_grad_norm(), own_norm)
                report.write(record, {**{f"lr_{k}": v * factor for k, v in part_lrs.items()}, **norm,
                                      **speed.rates(), **memory_used(device)})
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
                _save_checkpoint(engine, out / f"checkpoint-{step}", step, history, rank, export, cfg, report)
        export_trained(engine, out, rank == 0, export)
        report.plot(out, history)
    return history


def export_trained(engine, folder: Path, is_main: bool, export: Callable[[Path, bool], None]) -> None:
    """Run `export` with the trainable weights gathered (ZeRO-3 shards them across ranks)."""
    import deepspeed

    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None, enabled=zero3):
        if is_main:
            folder.mkdir(parents=True, exist_ok=True)
        export(folder, is_main)
    if dist.is_initialized():
        dist.barrier()


def _save_checkpoint(engine, folder: Path, step: int, history: list[dict], rank: int, export, cfg: TrainConfig,
                     report: RunReport):
    engine.save_checkpoint(str(folder / "ds"), tag="state", exclude_frozen_parameters=True)
    torch.save(rng_states(), folder / f"rng_rank{rank}.pt")
    export_trained(engine, folder, rank == 0, export)
    if rank == 0:
        report.plot(folder, history)
        world = dist.get_world_size() if dist.is_initialized() else 1
        (folder / STATE_FILE).write_text(json.dumps({"step": step, "history": history, "config": asdict(cfg),
                                                     "world_size": world}, indent=1) + "\n")
        done = complete_checkpoints(folder.parent)
        for old in done[: -cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()
