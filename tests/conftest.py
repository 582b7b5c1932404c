import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmpeft.tiny.world import WorldSpec, build_world  # noqa: E402
from mmpeft.tiny.zoo import ZooSpec, build_zoo  # noqa: E402

SMALL_WORLD = WorldSpec(seed=3, images=(40, 6, 30), stories=(4, 2, 2), shard_size=16)
SMALL_ZOO = ZooSpec(seed=3, clip_steps=2, lm_steps=2, lm_extra_chats=4, vae_steps=2, unet_steps=2,
                    sd_single_objects=4, eval_questions=4)


def _die_with_parent() -> None:
    """In a child process before it starts: on Linux, be killed when pytest ends. A run that
    outlives pytest-timeout's limit (which ends pytest with `os._exit`, past `subprocess.run`'s
    own cleanup) would otherwise go on training, unseen, on the cores the next run needs."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="session")
def small_world_spec():
    return SMALL_WORLD


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small world built once per test session."""
    return build_world(tmp_path_factory.mktemp("world") / "w", SMALL_WORLD)


@pytest.fixture(scope="session")
def small_zoo(small_world, tmp_path_factory):
    """Zoo models trained for two steps: real files, real loading, no learning."""
    root = tmp_path_factory.mktemp("zoo") / "z"
    return root, build_zoo(root, small_world, SMALL_ZOO, workers=2)


@pytest.fixture
def two_ranks(tmp_path):
    """Run `script` in two fresh interpreters, as a launcher starts ranks, with `sys.argv`
    `[rank, folder, *extra(rank)]`; each writes `rank{r}.json` into the folder, and the two
    parsed files come back. A hang fails the test instead of stalling the run."""

    def run(script: str, extra=lambda rank: []) -> list:
        ranks = [subprocess.Popen([sys.executable, "-c", script, str(r), str(tmp_path), *extra(r)],
                                  stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        for proc in ranks:
            try:
                _, err = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                for other in ranks:
                    other.kill()
                pytest.fail("the two ranks did not finish in 180 s")
            assert proc.returncode == 0, err
        return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    return run


@pytest.fixture(scope="session")
def run_shipped_config():
    """A function that runs `recipes/SCRIPT --config recipes/configs/CONFIG OVERRIDES...` from
    the repository root as a user launches it (offline, one thread) and returns its stdout;
    a non-zero exit fails the test with the tail of both streams."""
    root = Path(__file__).resolve().parents[1]

    def run(script: str, config: str, *overrides: str, timeout: int = 600) -> str:
        cmd = [sys.executable, f"recipes/{script}", "--config", f"recipes/configs/{config}", *overrides]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                              preexec_fn=_die_with_parent)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    return run


@pytest.fixture(scope="session")
def released_projector_factory(tmp_path_factory):
    """A function that writes a folder laid out as LLaVA-1.5's released stage 1
    (`mm_projector.bin` under LLaVA's own names, seeded random values) sized for the CLIP and
    LM folders given, and returns `(folder, state)`."""

    def write(clip: Path, lm: Path, name: str):
        vision = json.loads((clip / "config.json").read_text())["vision_config"]["hidden_size"]
        hidden = json.loads((lm / "config.json").read_text())["hidden_size"]
        gen = torch.Generator().manual_seed(5)
        state = {"model.mm_projector.0.weight": torch.randn(hidden, vision, generator=gen),
                 "model.mm_projector.0.bias": torch.randn(hidden, generator=gen),
                 "model.mm_projector.2.weight": torch.randn(hidden, hidden, generator=gen),
                 "model.mm_projector.2.bias": torch.randn(hidden, generator=gen)}
        folder = tmp_path_factory.mktemp("released") / name
        folder.mkdir()
        torch.save(state, folder / "mm_projector.bin")
        return folder, state

    return write
