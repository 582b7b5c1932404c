"""Every DeepSpeed config shipped in `ds_configs/` starts and steps through the training loop
(bf16, as the real configs train), one process with its own process group: ZeRO-2, ZeRO-3,
and ZeRO-3 with the optimizer and parameters offloaded to the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

_RUN = """
import json, sys, torch
from torch import nn
from mmpeft.train.loop import TrainConfig, train

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x, y, **_):
        return {"loss": (self.net(x.to(self.net[0].weight.dtype)).float().squeeze(-1) - y).pow(2).mean()}

gen = torch.Generator().manual_seed(1)  # the same data in every process
# one target for every sample: each step's batch differs, but every step moves towards it
data = [{"x": torch.randn(8, generator=gen), "y": torch.tensor(2.0)} for k in range(16)]
cfg = TrainConfig(output_dir=sys.argv[2], max_steps=3, micro_batch_size=4, lr=3e-2, warmup_ratio=0.0,
                  ds_config=sys.argv[1], bf16=True, log_steps=1)
history = train(Toy(), data, lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}, cfg,
                forward=lambda engine, batch: engine(**batch), export=lambda folder, is_main: None,
                lengths=[1] * len(data), has_image=[False] * len(data))
print(json.dumps([h["loss"] for h in history]))
"""


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_each_ds_config_starts_and_steps(name, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _RUN, str(ROOT / "ds_configs" / name), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(losses) == 3 and losses[-1] < losses[0]  # it stepped, and the steps lowered the loss
