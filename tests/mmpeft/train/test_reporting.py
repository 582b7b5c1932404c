"""What a run shows and leaves: TensorBoard events and wandb's offline files with every logged
value, `metrics.jsonl` through a resume, the progress bar or lines, `training.png`."""

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmpeft.train.reporting import PLOT_FILE, RunReport, chosen_reporters, kept_metrics, progress_bar_wanted

ROOT = Path(__file__).resolve().parents[3]

# a toy LM with two loss parts; 6 of each sample's 8 tokens are unmasked. argv[1]: the runs, as
# JSON: TrainConfig fields plus `resume` and `stop_at` (the run dies after that many steps)
_RUN = """
import json, shutil, sys, torch
from torch import nn
from torch.nn import functional as F
from mmpeft.train.loop import TrainConfig, train

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(32, 8), nn.Linear(8, 32)

    def forward(self, input_ids, attention_mask, labels, **_):
        ce = F.cross_entropy(self.head(self.embed(input_ids)).flatten(0, 1), labels.flatten())
        reg = 1e-3 * self.head.weight.pow(2).sum()
        return {"loss": ce + reg, "ce_loss": ce, "reg_loss": reg}

def collate(rows):
    ids = torch.stack([r["input_ids"] for r in rows])
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

class Killed(Exception):
    pass

gen = torch.Generator().manual_seed(1)
data = [{"input_ids": torch.randint(0, 32, (8,), generator=gen)} for _ in range(16)]
for run in json.loads(sys.argv[1]):
    resume, stop_at, steps = run.pop("resume", None), run.pop("stop_at", None), []

    def after_step(engine):
        steps.append(1)
        if len(steps) == stop_at:
            raise Killed

    cfg = TrainConfig(**{"micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "warmup_ratio": 0.2,
                         "lr_by_part": {"head": 5e-3}, "ds_config": None, **run})
    try:
        train(Toy(), data, collate, cfg, forward=lambda engine, batch: engine(**batch),
              export=lambda folder, is_main: None, lengths=[8] * 16, has_image=[False] * 16, resume=resume,
              after_step=after_step)
    except Killed:
        shutil.copy(f"{cfg.output_dir}/metrics.jsonl", f"{cfg.output_dir}/killed.jsonl")
"""

TIMED = ("time", "seconds", "samples_per_s", "tokens_per_s", "cpu_rss_gib")  # differ from run to run
VALUES = {"loss", "ce_loss", "reg_loss", "lr", "lr_head", "grad_norm", "samples_per_s", "tokens_per_s", "cpu_rss_gib"}
CPU_ONLY = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # the toy trains on the CPU on any machine


def _train(runs: list[dict], env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(runs)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, **CPU_ONLY, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_hold_every_value_at_every_logged_step_and_plots_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    stdout = _train([{"output_dir": str(out), "max_steps": 5, "save_steps": 2, "log_steps": 2, "keep_checkpoints": 0,
                      "report_to": "tensorboard"}])
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 4, 5]  # every log_steps, the first and the last
    assert all(set(r) == VALUES | {"step", "time", "seconds"} for r in rows)
    scalars = _scalars(out / "runs")
    assert set(scalars) == VALUES
    for tag, points in scalars.items():
        assert [s for s, _ in points] == [1, 2, 4, 5], tag
        assert [v for _, v in points] == pytest.approx([r[tag] for r in rows], rel=1e-6), tag  # float32 there
    for r in rows:
        assert r["loss"] == pytest.approx(r["ce_loss"] + r["reg_loss"], rel=1e-6)
        assert r["lr_head"] == pytest.approx(r["lr"] / 2)  # lr_by_part's 5e-3 on the schedule of lr 1e-2
        assert r["tokens_per_s"] / r["samples_per_s"] == pytest.approx(6)  # unmasked tokens per sample
        assert r["grad_norm"] > 0 and 0.05 < r["cpu_rss_gib"] < 64
    assert len({r["grad_norm"] for r in rows}) == 4
    # not a terminal: the plain lines, as before, and no bar
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 4 and "it/s" not in stdout and "s/step]" not in stdout
    for line, r in zip(lines, rows, strict=True):
        shown = f"step {r['step']}/5 ce_loss {r['ce_loss']:.4f} loss {r['loss']:.4f} reg_loss {r['reg_loss']:.4f} "
        assert re.fullmatch(re.escape(shown + f"lr {r['lr']:.2e} (") + r"\d+\.\d\d s/step\)", line), line
    assert f"tensorboard --logdir {out / 'runs'}" in stdout
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4", out / "checkpoint-5"):
        assert (folder / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", folder


def test_the_gradient_norm_is_logged_alike_without_zero_and_under_zero_2_and_3(tmp_path):
    # without ZeRO the loop measures it; under ZeRO DeepSpeed does (get_global_grad_norm)
    configs = {"none": None, "zero2": str(ROOT / "ds_configs/zero2.json"), "zero3": str(ROOT / "ds_configs/zero3.json")}
    _train([{"output_dir": str(tmp_path / name), "max_steps": 2, "log_steps": 1, "report_to": "none", "ds_config": ds}
            for name, ds in configs.items()])
    norms = {name: [r["grad_norm"] for r in _rows(tmp_path / name / "metrics.jsonl")] for name in configs}
    assert len(norms["none"]) == 2 and norms["none"][0] != norms["none"][1]
    assert norms["zero2"] == pytest.approx(norms["none"], rel=1e-5)
    assert norms["zero3"] == pytest.approx(norms["none"], rel=1e-5)
    assert not (tmp_path / "none" / "runs").exists()  # report_to: none


def test_two_ranks_train_alike_and_the_first_alone_writes(tmp_path):
    pytest.importorskip("tensorboard")
    script, out = tmp_path / "run.py", tmp_path / "run"
    script.write_text(_RUN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = {"output_dir": str(out), "max_steps": 3, "log_steps": 2, "report_to": "tensorboard",
           "ds_config": str(ROOT / "ds_configs/zero2.json")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script), json.dumps([run])], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, **CPU_ONLY})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("step ")] == ["1/3", "2/3", "3/3"]
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [1, 2, 3]
    assert len(list((out / "runs").iterdir())) == 1  # one event file
    assert {tag: [s for s, _ in points] for tag, points in _scalars(out / "runs").items()} == {
        tag: [1, 2, 3] for tag in VALUES}


def test_a_resumed_run_logs_each_step_once_with_the_values_of_an_uninterrupted_run(tmp_path):
    pytest.importorskip("tensorboard")
    full, killed = tmp_path / "full", tmp_path / "killed"
    run = {"max_steps": 6, "save_steps": 3, "log_steps": 1, "report_to": "tensorboard"}
    # the killed run logs steps 4 and 5 after its checkpoint at 3, then dies
    _train([{**run, "output_dir": str(full)}, {**run, "output_dir": str(killed), "stop_at": 6},
            {**run, "output_dir": str(killed), "resume": "latest"}])
    assert [r["step"] for r in _rows(killed / "killed.jsonl")] == [1, 2, 3, 4, 5]
    expected, resumed = _rows(full / "metrics.jsonl"), _rows(killed / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    untimed = [{k: v for k, v in r.items() if k not in TIMED} for r in (*expected, *resumed)]
    assert untimed[:3] == untimed[6:9]  # before the checkpoint: the killed run's own lines
    for a, b in zip(untimed[3:6], untimed[9:], strict=True):  # after it: the resumed run's, an exact resume
        assert b == pytest.approx(a, rel=1e-5)
    # TensorBoard drops the killed run's events past the checkpoint too
    assert [s for s, _ in _scalars(killed / "runs")["loss"]] == [1, 2, 3, 4, 5, 6]


def test_wandb_offline_writes_its_run_files_with_every_value(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    _train([{"output_dir": str(out), "max_steps": 2, "log_steps": 1, "report_to": ["wandb"]}],
           env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    for name in [*VALUES, "lr_by_part"]:  # the logged values and the config
        assert name.encode() in data, name
    assert not (out / "runs").exists()


def test_mlflow_records_every_value_at_every_logged_step(tmp_path):
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    _train([{"output_dir": str(tmp_path / "run"), "max_steps": 3, "log_steps": 2, "report_to": "mlflow"}],
           env={"MLFLOW_TRACKING_URI": store.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"})
    (run,) = [p.parent for p in store.glob("*/*/meta.yaml")]
    assert {p.name for p in (run / "metrics").iterdir()} == VALUES
    assert [line.split()[2] for line in (run / "metrics" / "loss").read_text().splitlines()] == ["1", "2", "3"]
    assert (run / "params" / "lr_by_part.head").read_text() == "0.005"
    assert "status: 3" in (run / "meta.yaml").read_text()  # finished


# --- without a run ---


def test_report_to_takes_a_name_a_list_none_or_auto_and_reports_every_problem():
    only_tensorboard = lambda package: package == "tensorboard"  # noqa: E731
    assert chosen_reporters("auto", only_tensorboard) == ["tensorboard"]
    assert chosen_reporters("auto", lambda package: False) == []
    assert chosen_reporters("none", only_tensorboard) == [] == chosen_reporters([], only_tensorboard)
    assert chosen_reporters(["tensorboard", "tensorboard"], only_tensorboard) == ["tensorboard"]
    assert chosen_reporters(["wandb", "mlflow"], lambda package: True) == ["wandb", "mlflow"]
    with pytest.raises(ValueError) as error:
        chosen_reporters(["tensorbord", "wandb", "mlflow", "none"], only_tensorboard)
    assert str(error.value).splitlines() == [
        "training.report_to: 'tensorbord' is not one of tensorboard, wandb, mlflow, none or auto",
        "training.report_to: 'none' stands alone, not in a list",
        "training.report_to names wandb, but the wandb package is not installed: pip install wandb",
        "training.report_to names mlflow, but the mlflow package is not installed: pip install mlflow"]
    with pytest.raises(ValueError, match="the tensorboard package is not installed"):
        chosen_reporters("tensorboard", lambda package: False)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_terminal_and_lines_on_a_pipe_or_file(tmp_path):
    assert progress_bar_wanted(_Terminal())
    assert not progress_bar_wanted(io.StringIO()) and not progress_bar_wanted(object())
    with open(tmp_path / "log.txt", "w") as file:
        assert not progress_bar_wanted(file)
    records = [{"step": s, "loss": 2.0 / s, "part_loss": 1.0, "lr": 1e-3, "seconds": 0.1 * s} for s in (1, 2, 3)]
    shown = {}
    for how, stream in (("bar", _Terminal()), ("lines", None)):
        lines = []
        with RunReport(tmp_path / how, [], True, 3, 5, 0, {}, log=lines.append, progress=stream) as report:
            for record in records:
                report.advance(record)
                if report.due(record["step"]):
                    report.write(record, {})
        shown[how] = lines, stream.getvalue() if stream else ""
    lines, drawn = shown["bar"]
    assert lines == [] and "3/3" in drawn and "loss=0.6667" in drawn and "s/step" in drawn
    lines, drawn = shown["lines"]
    assert drawn == "" and len(lines) == 2  # steps 1 and 3: the first and the last
    assert re.fullmatch(r"step 1/3 loss 2\.0000 part_loss 1\.0000 lr 1\.00e-03 \(\d+\.\d\d s/step\)", lines[0])
    assert lines[1].startswith("step 3/3 loss 0.6667 part_loss 1.0000 lr 1.00e-03 (")
    for how in shown:  # the bar changes the display only
        assert [r["step"] for r in _rows(tmp_path / how / "metrics.jsonl")] == [1, 3]


def test_metrics_past_the_resumed_step_and_a_line_cut_short_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert [json.loads(line)["step"] for line in kept_metrics(path, 2)] == [1, 2]
    with RunReport(tmp_path, [], True, 10, 1, 3, {}, log=lambda line: None) as report:
        report.write({"step": 4, "loss": 0.25, "lr": 1e-3, "seconds": 1.0}, {"grad_norm": 2.0})
    assert [(r["step"], r["loss"]) for r in _rows(path)] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.25)]
    assert _rows(path)[-1]["grad_norm"] == 2.0
    RunReport(tmp_path, [], False, 10, 1, 0, {}).write({"step": 1, "loss": 9.0, "lr": 0.0, "seconds": 0.0}, {})
    assert len(_rows(path)) == 4  # another rank writes nothing


def test_without_matplotlib_the_plot_is_skipped_with_one_note(tmp_path, monkeypatch):
    history = [{"step": 1, "loss": 1.0, "lr": 1e-3, "seconds": 0.1}]
    lines = []
    with RunReport(tmp_path, [], True, 1, 1, 0, {}, log=lines.append) as report:
        report.plot(tmp_path, history)
        assert (tmp_path / PLOT_FILE).is_file()
        (tmp_path / PLOT_FILE).unlink()
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if it were not installed
        report.plot(tmp_path, history)
        report.plot(tmp_path / "checkpoint-1", history)
    assert lines == ["training.png skipped: matplotlib is not installed (pip install matplotlib)"]
    assert not (tmp_path / PLOT_FILE).exists()
