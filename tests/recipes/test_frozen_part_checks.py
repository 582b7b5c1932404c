"""The LLaVA and MiniGPT-5 recipes stop at start-up, before any model loads, when a frozen
part would keep random weights, and name the setting to give. The real configs run through
their launch command with the Hub offline: a run that passes the check goes on to load its
LM and fails there instead."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STOP = "a frozen part would keep its random weights (nothing would ever train it):"
CONNECTOR_ANY = "or train it (model.trainable.connector: full), or list connector in model.allow_random_frozen " \
                "to train with it random all the same"


def _mapper_line(part: str, remedy: str) -> str:
    return (f"model.mapper_trainable.{part} is frozen but the mapper's {part} is random: {remedy}, or train it "
            f"(model.mapper_trainable.{part}: full), or list mapper.{part} in model.allow_random_frozen to train "
            "with it random all the same")


def _start(script: str, config: str, *overrides: str, tmp_path: Path) -> tuple[int, str, str]:
    cmd = [sys.executable, f"recipes/{script}", "--config", f"recipes/configs/{config}",
           f"training.output_dir={tmp_path / 'out'}", "threads=1", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return proc.returncode, proc.stdout, proc.stderr


def _stopped(result) -> list[str]:
    """The lines of the start-up error, after checking that nothing loaded before it."""
    code, stdout, stderr = result
    assert code != 0 and STOP in stderr, stderr[-3000:]
    assert "model: " not in stdout  # stopped before the models loaded
    error = stderr[stderr.index(f"ValueError: {STOP}"):]  # not the traceback's source line
    return [line.removeprefix("[rank0]: ") for line in error.splitlines()[1:]]  # torch.distributed's prefix


def _stage1_folder(folder: Path, connector_from: str | None) -> Path:
    """What stage 2 reads of a stage-1 folder before loading anything: its files and its record."""
    folder.mkdir()
    for name in ("mapper.safetensors", "connector.safetensors", "llava_adapter"):
        (folder / name).write_bytes(b"")
    (folder / "mmpeft_config.json").write_text(json.dumps({"connector_from": connector_from}))
    return folder


def test_minigpt5_stage2_without_stage1_names_the_connector_and_both_mapper_parts(tmp_path):
    lines = _stopped(_start("minigpt5_stage2.py", "minigpt5_stage2_vicuna.yaml", "model.init_from=null",
                            tmp_path=tmp_path))
    assert lines[:3] == [
        "model.trainable.connector is frozen but the connector is random: give model.init_connector=<a LLaVA "
        "stage-1 output, or a folder or Hub id with LLaVA's mm_projector.bin>, or a model.init_from whose stage 1 "
        f"was given one, {CONNECTOR_ANY}",
        _mapper_line("mlp", "give model.init_from=<a MiniGPT-5 stage-1 output>"),
        _mapper_line("query", "give model.init_from=<a MiniGPT-5 stage-1 output>")]


def test_minigpt5_stage2_reads_whether_stage1_carried_a_connector(tmp_path):
    random = _stage1_folder(tmp_path / "random", None)
    lines = _stopped(_start("minigpt5_stage2.py", "minigpt5_stage2_vicuna.yaml", f"model.init_from={random}",
                            tmp_path=tmp_path))
    assert lines[0].startswith("model.trainable.connector is frozen but the connector is random")
    assert not any(line.startswith("model.mapper_trainable") for line in lines)  # the mapper comes from stage 1
    aligned = _stage1_folder(tmp_path / "aligned", "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5")
    for overrides in ([f"model.init_from={aligned}"], [f"model.init_from={random}", f"model.init_connector={aligned}"]):
        code, _, stderr = _start("minigpt5_stage2.py", "minigpt5_stage2_vicuna.yaml", *overrides, tmp_path=tmp_path)
        assert code != 0 and STOP not in stderr and "lmsys/vicuna-7b-v1.5" in stderr, stderr[-3000:]  # went on


def test_minigpt5_stage1_stops_for_a_frozen_mapper_part_then_reads_its_released_connector(tmp_path):
    lines = _stopped(_start("minigpt5_stage1.py", "minigpt5_stage1_vicuna.yaml",
                            "model.mapper_trainable={mlp: frozen, query: full, transformer: full}", tmp_path=tmp_path))
    assert lines[0] == _mapper_line("mlp", "").replace("random: , or train", "random: train")
    # the check passed, the released projector is the next thing read: offline, the error says how to get it
    code, stdout, stderr = _start("minigpt5_stage1.py", "minigpt5_stage1_vicuna.yaml", tmp_path=tmp_path)
    assert code != 0 and "model: " not in stdout, stderr[-3000:]
    assert "model.init_connector: liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5 is no local file or " \
           "folder, and as a Hub repo it cannot be downloaded" in stderr


@pytest.mark.parametrize("script,config,remedy", [
    ("llava_finetune.py", "llava_finetune_7b.yaml",
     "give model.init_connector=<a LLaVA stage-1 output, or a folder with LLaVA's released mm_projector.bin>, "),
    ("llava_pretrain.py", "llava_pretrain_7b.yaml", ""),
])
def test_llava_stops_for_a_frozen_connector_it_was_not_given(script, config, remedy, tmp_path):
    frozen = ["model.trainable.connector=frozen", *(["model.init_connector=null"] if "finetune" in script else [])]
    lines = _stopped(_start(script, config, *frozen, tmp_path=tmp_path))
    assert lines[0] == f"model.trainable.connector is frozen but the connector is random: {remedy}" + \
        CONNECTOR_ANY.removeprefix("" if remedy else "or ")
    code, _, stderr = _start(script, config, *frozen, "model.allow_random_frozen=[connector]", tmp_path=tmp_path)
    assert code != 0 and STOP not in stderr, stderr[-3000:]  # allowed: it went on to load the LM
