import json
import subprocess
from pathlib import Path

from mmpeft import cli


def test_connectors_compare_every_connector_at_the_same_stage_2_length(tmp_path, monkeypatch, capsys):
    commands = []

    def run(cmd, check, cwd):
        commands.append(cmd)
        out = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("training.output_dir=")))
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"answer_accuracy_after": 0.5, "chance": 0.34}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(cli.subprocess, "run", run)
    cli.run_connectors(tmp_path / "runs", tmp_path / "cache")
    runs = [runs for _, _, runs in cli.CONNECTORS]
    assert len(commands) == sum(map(len, runs))
    k = 0
    for stages in runs:
        for i, (_, config, _) in enumerate(stages):
            steps = [a for a in commands[k] if a.startswith("training.max_steps=")]
            assert any(a.endswith(f"{config}.yaml") for a in commands[k])
            # the last stage of each trains the same number of steps, whatever its config's default
            assert steps == (["training.max_steps=1000"] if i == len(stages) - 1 else [])
            k += 1
    table = capsys.readouterr().out
    assert all(name in table for name, _, _ in cli.CONNECTORS)
