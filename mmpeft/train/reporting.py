"""What a run shows while it trains and what it leaves to look at afterwards.

At every logged step (`training.log_steps`, the first and the last) the loop hands over the
loss and its parts, the learning rate of each part that `lr_by_part` names (`lr_{part}`;
`lr` is the rest's), the gradient norm before clipping, tokens and samples per second
and memory. They go to `metrics.jsonl` (one line a step, flushed as the run goes) and to the
services `training.report_to` names: TensorBoard (event files in `runs/`), Weights & Biases
(with `WANDB_MODE=offline`, its files in `wandb/`) or MLflow. A terminal shows a progress
bar; a pipe or a file gets one line a logged step, `step N/M loss X lr Y (Z s/step)`.
`training.png` plots the loss parts and learning rates against the step, at the end of the
run and in every checkpoint.

Only the first rank writes; the values it writes are the same on every rank (the loop
averages them over the ranks first), and nothing here starts a collective that the other
ranks would not.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import torch

from mmpeft.train.collectives import all_reduce

REPORTERS = ("tensorboard", "wandb", "mlflow")
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
EVENTS_DIR = "runs"  # tensorboard --logdir OUTPUT/runs
NOT_LOSSES = ("step", "lr", "seconds")  # the history's keys that are not losses


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def chosen_reporters(report_to: str | Sequence[str], installed: Callable[[str], bool] = _installed) -> list[str]:
    """The services that `training.report_to` names: one of `REPORTERS` or a list of them;
    `none` for none; `auto` for TensorBoard when its package is installed, else none. An
    unknown name, or a service whose package is not installed, is an error, every one of
    them reported at once. `installed(package)`: whether a package can be imported."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names == ["auto"]:
        return ["tensorboard"] if installed("tensorboard") else []
    if names == ["none"] or not names:
        return []
    problems = [f"training.report_to: {n!r} stands alone, not in a list" if n in ("none", "auto") else
                f"training.report_to: {n!r} is not one of {', '.join(REPORTERS)}, none or auto"
                for n in names if n not in REPORTERS]
    problems += [f"training.report_to names {n}, but the {n} package is not installed: pip install {n}"
                 for n in dict.fromkeys(names) if n in REPORTERS and not installed(n)]
    if problems:
        raise ValueError("\n".join(problems))
    return list(dict.fromkeys(names))


def progress_bar_wanted(stream) -> bool:
    """A progress bar when `stream` is a terminal; one line a logged step when it is a pipe
    or a file (CI, a log file, the `deepspeed` launcher), where a bar's redraws are noise."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class Throughput:
    """Samples and tokens trained on since the last logged step. `add` counts a step's
    micro-batches on this rank (attention-mask ones, else every input id); `rates` sums the
    tokens over the ranks (a collective: every rank calls it at the same steps, whatever its
    batches held) and gives `samples_per_s` and `tokens_per_s` (absent when no batch held
    input ids) since the previous call. `device`: the training device, where the sum runs."""

    def __init__(self, samples_per_step: int, device: torch.device):
        self.samples_per_step, self.device = samples_per_step, device
        self._reset()

    def _reset(self):
        self.steps, self.since = 0, time.time()
        self.counts = torch.zeros(2, dtype=torch.float64, device=self.device)  # tokens, micro-batches with ids

    def add(self, micro: list[dict]) -> None:
        self.steps += 1
        for batch in micro:
            counted = batch.get("attention_mask", batch.get("input_ids"))
            if counted is not None:  # summed on the device: no wait for the GPU here
                self.counts[0] += counted.sum() if "attention_mask" in batch else counted.numel()
                self.counts[1] += 1

    def rates(self) -> dict[str, float]:
        seconds = max(time.time() - self.since, 1e-9)
        tokens, with_ids = all_reduce(self.counts, self.device).tolist()
        rates = {"samples_per_s": self.steps * self.samples_per_step / seconds}
        if with_ids:
            rates["tokens_per_s"] = tokens / seconds
        self._reset()
        return rates


def gradient_norm(parameters: Sequence[torch.nn.Parameter]) -> float | None:
    """The 2-norm of the gradients held in `parameters`, None when none holds one. Without
    ZeRO and in float32 DeepSpeed clips with torch's optimizer and keeps no norm; its
    gradients, already averaged over the ranks, are whole on every rank before the step.
    Under ZeRO (and in bf16/fp16) `engine.get_global_grad_norm()` has the norm instead."""
    grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)).item() if grads else None


def grad_norm_entry(engine_norm, own_norm: float | None) -> dict[str, float]:
    """`{"grad_norm": norm}`: DeepSpeed's (`engine.get_global_grad_norm()`, kept by ZeRO's and
    by the bf16 / fp16 optimizers), else `own_norm` (`gradient_norm`); empty when neither is known."""
    norm = own_norm if engine_norm is None else engine_norm
    return {} if norm is None else {"grad_norm": float(norm)}


def memory_used(device: torch.device) -> dict[str, float]:
    """This process's memory in GiB: the most the GPU has held allocated on CUDA, the
    resident set size on the CPU."""
    if device.type == "cuda":
        return {"gpu_max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import psutil  # a DeepSpeed dependency

    return {"cpu_rss_gib": psutil.Process().memory_info().rss / 2**30}


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _TensorBoard:
    def __init__(self, folder: Path, start_step: int, config: dict, name: str):
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard drops the events past the start that an earlier run in this folder wrote (a killed run
        # logs steps after its last checkpoint), as metrics.jsonl drops its lines
        self.writer = SummaryWriter(str(folder / EVENTS_DIR), purge_step=start_step + 1)
        text = "\n".join("    " + line for line in json.dumps(config, indent=1, default=str).splitlines())
        self.writer.add_text("config", text, global_step=start_step)  # indented: a code block in Markdown

    def write(self, values: dict[str, float], step: int):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, failed: bool):
        self.writer.close()


class _Wandb:
    def __init__(self, folder: Path, start_step: int, config: dict, name: str):
        import wandb

        # project and mode (WANDB_PROJECT, WANDB_MODE=offline) come from wandb's own settings
        self.run = wandb.init(dir=str(folder), name=name, config=config)

    def write(self, values: dict[str, float], step: int):
        self.run.log(values, step=step)

    def close(self, failed: bool):
        self.run.finish(exit_code=1 if failed else 0)


class _MLflow:
    def __init__(self, folder: Path, start_step: int, config: dict, name: str):
        import mlflow

        self.mlflow = mlflow  # where it records: MLFLOW_TRACKING_URI, else MLflow's default
        mlflow.start_run(run_name=name)
        mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})  # MLflow's oldest length limit

    def write(self, values: dict[str, float], step: int):
        self.mlflow.log_metrics(values, step=step)

    def close(self, failed: bool):
        self.mlflow.end_run("FAILED" if failed else "FINISHED")


OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}


def kept_metrics(path: Path, last_step: int) -> list[str]:
    """The lines of a `metrics.jsonl` up to `last_step`: a run killed after its last
    checkpoint logged steps that the resumed run logs again; a line cut short by the kill
    is dropped."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            kept.append(line)
    return kept


def plot_training(history: list[dict], path: Path, part_lrs: dict[str, float], base_lr: float) -> None:
    """`training.png` at `path`: every loss part (top) and learning rate (bottom) of
    `history` against the step. `part_lrs`: the peak rate of each `lr_by_part` part, drawn
    on the schedule of the rest's (`base_lr`). Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg draws the PNG

    steps = [h["step"] for h in history]
    figure = Figure(figsize=(8, 6), layout="constrained")
    losses, rates = figure.subplots(2, 1, sharex=True)
    for key in [k for k in history[0] if k not in NOT_LOSSES]:
        losses.plot(steps, [h.get(key, float("nan")) for h in history], label=key)
    rates.plot(steps, [h["lr"] for h in history], label="lr")
    for part, peak in part_lrs.items():
        if base_lr:
            rates.plot(steps, [h["lr"] * peak / base_lr for h in history], label=f"lr_{part}")
    losses.set_ylabel("loss")
    rates.set_ylabel("learning rate")
    rates.set_xlabel("step")
    for axes in (losses, rates):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)


class RunReport:
    """The run's progress display, `metrics.jsonl`, reporters and plots, on the first rank
    (`is_main`); on the others every method but `due` does nothing. `start_step`: the step
    the run starts or resumes at; logged lines past it are dropped. `progress`: the stream
    to draw a bar on, or None for a line a logged step through `log`. `config`: what the
    reporters record as the run's settings. `part_lrs`, `base_lr`: for the plot, as
    `plot_training` takes them. Use it as a context manager: leaving closes the reporters (an
    error marks a wandb or MLflow run as failed)."""

    def __init__(self, output_dir: Path, reporters: Sequence[str], is_main: bool, max_steps: int, log_steps: int,
                 start_step: int, config: dict, log: Callable[[str], None] = print, progress: TextIO | None = None,
                 part_lrs: dict[str, float] | None = None, base_lr: float = 0.0):
        self.is_main, self.max_steps, self.log_steps, self.log = is_main, max_steps, max(1, log_steps), log
        self.part_lrs, self.base_lr = part_lrs or {}, base_lr
        self.start_step, self.started = start_step, time.time()  # again once the reporters have started
        self.writers, self.metrics, self.bar, self.plot_skipped = [], None, None, False
        if not is_main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / METRICS_FILE
        kept = kept_metrics(path, start_step)
        path.write_text("".join(line + "\n" for line in kept))
        self.metrics = path.open("a")
        if "tensorboard" in reporters:
            log(f"reporting to TensorBoard: tensorboard --logdir {output_dir / EVENTS_DIR}")
        try:
            for name in reporters:
                self.writers.append(OPENERS[name](output_dir, start_step, config, output_dir.name))
        except BaseException:
            self.close(failed=True)
            raise
        if progress is not None:
            from tqdm import tqdm

            # s/step even when a step takes less than a second (tqdm would show steps/s)
            shown = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_inv_fmt}{postfix}]"
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", file=progress, dynamic_ncols=True,
                            bar_format=shown)
        self.started = time.time()

    def due(self, step: int) -> bool:
        """Whether `step` is logged: every `log_steps`, the first and the last."""
        return step % self.log_steps == 0 or step == self.max_steps or step == 1

    def advance(self, record: dict) -> None:
        """After every step: move the bar on."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            self.bar.update(1)

    def write(self, record: dict, measures: dict[str, float]) -> None:
        """At a logged step: `record` (step, loss parts, lr, seconds) and the step's other
        `measures` to `metrics.jsonl` and the reporters, and the step's line when there is
        no bar."""
        if not self.is_main:
            return
        step = record["step"]
        values = {k: v for k, v in record.items() if k not in ("step", "seconds")} | measures
        self.metrics.write(json.dumps({"step": step, "time": time.time(), "seconds": record["seconds"],
                                       **values}) + "\n")
        self.metrics.flush()
        for writer in self.writers:
            writer.write(values, step)
        if self.bar is None:
            parts = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in NOT_LOSSES)
            per_step = (time.time() - self.started) / max(1, step - self.start_step)
            self.log(f"step {step}/{self.max_steps} {parts} lr {record['lr']:.2e} ({per_step:.2f} s/step)")

    def plot(self, folder: Path, history: list[dict]) -> None:
        """`training.png` of `history` into `folder`; without matplotlib, says once that it is skipped."""
        if not self.is_main or not history:
            return
        try:
            plot_training(history, folder / PLOT_FILE, self.part_lrs, self.base_lr)
        except ImportError:
            if not self.plot_skipped:
                self.log(f"{PLOT_FILE} skipped: matplotlib is not installed (pip install matplotlib)")
            self.plot_skipped = True

    def __enter__(self) -> RunReport:
        return self

    def __exit__(self, error_type, error, trace) -> None:
        self.close(failed=error_type is not None)

    def close(self, failed: bool = False) -> None:
        """Close the reporters (`failed`: mark the run so), the bar and `metrics.jsonl`."""
        for writer in reversed(self.writers):
            writer.close(failed)
        self.writers = []
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def part_learning_rates(names: Sequence[str], lr_by_part: dict[str, float]) -> dict[str, float]:
    """The `lr_by_part` entries that set the rate of at least one of the trainable
    parameter `names` (the first matching fragment wins, as in the parameter groups)."""
    used = {next((k for k in lr_by_part if k in name), None) for name in names}
    return {k: v for k, v in lr_by_part.items() if k in used}

