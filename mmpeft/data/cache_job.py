"""The parts of a cache build that make it a job rather than a loop: frozen models placed on
the rank's accelerator in the dtype they train in and put back afterwards, a progress line
with a rate and a time left, a disk-space check before the first shard, and a wait for the
other ranks' shards that lasts as long as some rank is making progress.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import torch

from mmpeft.train.placement import is_partitioned

HEARTBEAT = ".progress-rank"  # + rank: what a rank has done so far, rewritten after every batch


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of `model`'s first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextmanager
def placed(models: Sequence[torch.nn.Module], device: torch.device | str,
           dtype: torch.dtype | None = None) -> Iterator[None]:
    """Inside, every parameter and buffer of `models` on `device`, the floating-point ones in
    `dtype` (None: as they are). On leaving, each module holds again the very parameter and
    buffer objects it had, so a model cast to bf16 for the build returns to fp32 without a
    lossy round trip, and frozen models stay where the recipe put them until the engine
    places them. Tied weights stay tied."""
    moved: dict[int, torch.Tensor] = {}
    saved: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    slots = set()
    with torch.no_grad():
        for module in chain.from_iterable(m.modules() for m in models):
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if (id(module), name) in slots:
                    continue
                slots.add((id(module), name))
                if id(tensor) not in moved:
                    if isinstance(tensor, torch.nn.Parameter) and is_partitioned(tensor):
                        raise ValueError("a cache build runs a frozen model whole, but this one is partitioned "
                                         "(ZeRO-3): load the frozen model outside `partitioned_loading`")
                    cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                    data = tensor.detach().to(device=device, dtype=cast)
                    moved[id(tensor)] = torch.nn.Parameter(data, tensor.requires_grad) \
                        if isinstance(tensor, torch.nn.Parameter) else data
                saved.append((module, name, tensor))
    try:
        for module, name, tensor in saved:
            setattr(module, name, moved[id(tensor)])
        yield
    finally:
        for module, name, tensor in saved:
            setattr(module, name, tensor)
        moved.clear()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the build's copies, before the engine needs the memory


def human_bytes(n: float) -> str:
    """`n` bytes in binary units: `512 B`, `1.5 KiB`, `657.3 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """`seconds` as `2d03h`, `1h02m`, `3m05s` or `12s` (`?` when unknown)."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = round(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Counts items done out of `total` and logs `done/total`, the rate and the time left
    (`label: 1280/69750 images (1.8%), 45.2 images/s, ETA 25m11s`) at most every `every`
    seconds, and always when the last item is done. `clock`: seconds, monotonic."""

    def __init__(self, total: int, what: str, label: str, log: Callable[[str], None], every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.what, self.label, self.log, self.every, self.clock = total, what, label, log, every, clock
        self.done = 0
        self.start = self.last = clock()

    def line(self) -> str:
        """The progress so far, as logged."""
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        share = 100 * self.done / self.total if self.total else 100.0
        return (f"{self.label}: {self.done}/{self.total} {self.what} ({share:.1f}%), {rate:.1f} {self.what}/s, "
                f"ETA {duration(eta)}")

    def advance(self, n: int) -> None:
        """`n` more items done; logs when `every` seconds have passed or all are done."""
        self.done += n
        if self.done >= self.total or self.clock() - self.last >= self.every:
            self.last = self.clock()
            self.log(self.line())


def check_free_space(folder: Path, needed: int, what: str) -> int:
    """Raise an `OSError` naming `folder`, the bytes `needed` (`what` says for what) and the
    bytes free when they do not fit on its file system; else return the free bytes."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(f"not enough disk space for the cache in {folder}: {what} need {human_bytes(needed)} "
                      f"({needed} bytes), only {human_bytes(free)} ({free} bytes) is free there; free space or "
                      "point the cache elsewhere")
    return free


def wait_for_shards(folder: Path, shards: Sequence[Path], log: Callable[[str], None], stall_seconds: float,
                    log_seconds: float = 60.0, poll_seconds: float = 1.0,
                    clock: Callable[[], float] = time.monotonic) -> None:
    """Return once every path of `shards` exists (each rank writes its own under `folder`,
    on a file system the ranks share). Waits as long as the ranks make progress: a new shard
    or a rewritten heartbeat (`.progress-rank<r>`, after every batch) starts the clock
    again, and only `stall_seconds` without either raise a `TimeoutError`. Progress is seen
    as a change of what the files say, not of their times, so clocks that differ between
    nodes do not matter."""
    last_state, last_change, last_log = None, clock(), clock()
    while True:
        missing = [p for p in shards if not p.exists()]
        if not missing:
            return
        beats = []
        for path in sorted(folder.glob(HEARTBEAT + "*")):
            try:
                beats.append((path.name, path.read_text()))
            except OSError:  # rewritten or removed while read: a change all the same
                beats.append((path.name, None))
        state = (len(missing), tuple(beats))
        now = clock()
        if state != last_state:
            last_state, last_change = state, now
        elif now - last_change > stall_seconds:
            raise TimeoutError(f"cache {folder}: {len(missing)} of {len(shards)} shards are still missing "
                               f"(first: {missing[0].name}) and no rank has finished a batch for "
                               f"{stall_seconds:.0f} s; a rank has stopped. Rerun to continue from the shards "
                               "already written")
        if now - last_log >= log_seconds:
            last_log = now
            log(f"cache {folder}: waiting for {len(missing)} of {len(shards)} shards from the other ranks")
        time.sleep(poll_seconds)
