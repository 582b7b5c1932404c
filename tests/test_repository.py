import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quick_start_has_two_commands_and_ci_runs_the_second():
    commands = _quick_start_commands()
    assert len(commands) == 2
    assert "mmpeft pipeline" in commands[0]
    ci = (ROOT / ".ci/run").read_text()
    assert commands[1] in ci.splitlines()


def test_ds_configs_leave_training_values_to_the_training_arguments():
    stages = {}
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        config = json.loads(path.read_text())
        stages[path.name] = config["zero_optimization"]["stage"]
        for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert config[key] == "auto", (path.name, key)
        assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert stages == {"zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}


def test_docs_figures_come_from_a_run():
    figures = (ROOT / "docs" / "figures.md").read_text()
    assert "PLACEHOLDER" not in figures and not re.search(r"\b[A-Z]+(_[A-Z]+)*_FIGURES\b", figures)
    assert re.search(r"image->text recall@1 .*\d\.\d{3}", figures)


def test_readme_is_short_and_leads_to_real_model_training():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250
    # newcomers must reach "how to train on my own data with a real model" on the first screens
    assert any(line.startswith("## ") and "LLaVA stage 2 on your data with a real model" in line
               for line in lines[:80])
