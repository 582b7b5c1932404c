"""Where a rank's models live: on its own accelerator for evaluation and generation, and,
under ZeRO-3, the LM partitioned over the ranks while it loads.

Without partitioned loading every rank first builds the whole model in host memory and
DeepSpeed partitions it only when the engine starts: a 7B LM in bf16 is 13.5 GB per rank,
8 ranks of a node 108 GB at once. Inside `partitioned_loading` transformers'
`from_pretrained` builds the model under `deepspeed.zero.Init`, so each rank holds its
1/N of the weights from the first tensor on. A partitioned module has empty parameters
until gathered: it runs only inside the engine (or under `deepspeed.zero.GatheredParameters`,
which every rank must enter), so a recipe evaluates a partitioned model only after
training, on the run reloaded from its output folder. An embedding that grows for new
tokens is rebuilt whole by transformers (its shape is read elsewhere) and partitioned when
the engine starts.

A run without CUDA also learns here whether this CPU computes in bfloat16 at speed: without
AVX-512 BF16 or AMX kernels a bf16 matmul takes tens to hundreds of times longer than a
float32 one, and a real config (bf16) rehearsed on such a CPU takes hours for two steps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


def rank_device(env: Mapping[str, str] | None = None, cuda: bool | None = None) -> torch.device:
    """This rank's accelerator: `cuda:LOCAL_RANK` (the launcher sets it) when CUDA is
    available, else the CPU. Evaluation and generation after training run there."""
    env = os.environ if env is None else env
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return torch.device("cuda", int(env.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")


def zero3_loading_config(training: dict, quantized: bool = False) -> dict | None:
    """The run's DeepSpeed config, filled as the loop fills it, when it partitions
    parameters (ZeRO-3) and the LM is not quantized (bitsandbytes quantizes while loading,
    which zero.Init cannot partition); else None. `training`: the recipe's `training:`
    section. The batch sizes are filled for the process group's size (`WORLD_SIZE` before
    it is joined; one process without either)."""
    import torch.distributed as dist

    from mmpeft.train.loop import TrainConfig, deepspeed_config

    if quantized:
        return None
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    config = deepspeed_config(TrainConfig(**training), world)
    return config if config.get("zero_optimization", {}).get("stage") == 3 else None


@contextmanager
def partitioned_loading(ds_config: dict | None) -> Iterator[bool]:
    """Inside, `from_pretrained` partitions each model over the ranks as it loads it, and
    transformers' embedding resizing gathers and re-partitions (ZeRO-3's `ds_config`, from
    `zero3_loading_config`); with None, models load whole. Yields whether it partitions.
    Every rank must load inside it alike. Outside it, loading is whole again: a reload on
    one rank after training must not wait for the others."""
    if ds_config is None:
        yield False
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    active = HfDeepSpeedConfig(ds_config)  # transformers holds it by a weak reference: keep it alive here
    try:
        yield True
    finally:
        unset_hf_deepspeed_config()
        del active


def is_partitioned(parameter: torch.nn.Parameter) -> bool:
    """Whether `parameter` is a ZeRO-3 shard (its full tensor lives across the ranks)."""
    return hasattr(parameter, "ds_id")


def full_numel(parameter: torch.nn.Parameter) -> int:
    """The element count of `parameter` whole, also when ZeRO-3 holds it partitioned."""
    return getattr(parameter, "ds_numel", parameter.numel())


def device_of(module: torch.nn.Module) -> torch.device:
    """The device `module` computes on (its first parameter's; the CPU when it has none):
    evaluation code moves its inputs there rather than assuming one."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def to_device(batch: dict, device: torch.device) -> dict:
    """`batch` with every tensor moved to `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def match_partitioned_dtype(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Under 16-bit training, the parameters of a model that loaded partly partitioned
    (ZeRO-3 `partitioned_loading`) and are not yet partitioned (LoRA, a new connector, a
    resized embedding) in `dtype`: the engine casts only what it partitions itself, and its
    optimizer takes one dtype. A model with no partitioned parameter is left to the engine."""
    if dtype is None or not any(is_partitioned(p) for p in model.parameters()):
        return
    for p in model.parameters():
        if p.is_floating_point() and not is_partitioned(p) and p.dtype != dtype:
            p.data = p.data.to(dtype)


SLOW_BF16 = 8.0  # bf16 / float32 matmul time beyond which a CPU lacks bfloat16 kernels


def cpu_bf16_slowdown(size: int = 256, repeats: int = 5) -> float:
    """How many times longer a `size`-square bfloat16 matmul takes than a float32 one on
    this CPU, at the current thread count (best of `repeats` each): about 1 or below with
    bfloat16 kernels (AVX-512 BF16, AMX), above `SLOW_BF16` without (AVX2 only)."""
    a, b = torch.randn(size, size, device="cpu"), torch.randn(size, size, device="cpu")

    def best(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # the first call picks and readies the kernel
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def slow_bf16_warning(training: dict, cuda: bool, slowdown=cpu_bf16_slowdown) -> str | None:
    """The start-up warning for `training:` settings that ask for bf16 on a machine without
    CUDA whose CPU computes bfloat16 slowly (`slowdown()` above `SLOW_BF16`), else None. The
    run keeps the precision it was given: a float32 rehearsal is the user's choice to make."""
    if cuda or not training.get("bf16"):
        return None
    ratio = slowdown()
    if ratio <= SLOW_BF16:
        return None
    return (f"warning: training.bf16 on a CPU without bfloat16 kernels (no AVX-512 BF16 or AMX): a bfloat16 "
            f"matmul here takes {ratio:.0f}x as long as a float32 one, so each step runs that much slower; "
            "to rehearse this config on this CPU, add training.bf16=false")
