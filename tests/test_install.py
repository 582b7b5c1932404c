"""A plain (not editable) install into a fresh virtual environment runs a recipe and
data_gen from another folder: recipes, configs, DeepSpeed configs and prompts all ship
inside the package."""

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with mmpeft installed from a wheel built from this checkout; the other
    packages (torch, transformers, ...) are seen through a .pth file, not reinstalled."""
    base = tmp_path_factory.mktemp("install")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheels = base / "wheels"
    # without setuptools here, pip builds in an isolated environment it fills from the index
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("mmpeft-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True)
    return python, site


def _run(python, args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_installed_package_is_the_one_imported(installed, tmp_path):
    python, site = installed
    out = _run(python, ["-c", "import mmpeft, mmpeft.recipes, mmpeft.data_gen, mmpeft.ds_configs; "
                              "print(mmpeft.__file__)"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(site)
    assert (site / "mmpeft" / "recipes" / "configs" / "llava_finetune_7b.yaml").is_file()
    assert (site / "mmpeft" / "ds_configs" / "zero3.json").is_file()
    assert (site / "mmpeft" / "data_gen" / "prompts" / "conversation.json").is_file()


def test_a_recipe_and_data_gen_run_from_another_folder(installed, small_world, small_zoo, tmp_path):
    python, _ = installed
    out = tmp_path / "run"
    recipe = _run(python, ["-m", "mmpeft.recipes.llava_finetune", "--config", "llava_finetune_tiny",
                           f"fixture.world_dir={small_world}", f"fixture.zoo_dir={small_zoo[0]}",
                           f"training.output_dir={out}", "training.max_steps=2", "training.save_steps=0",
                           "model.init_connector=null", "data.feature_cache=null", "eval.limit=4"], tmp_path)
    assert recipe.returncode == 0, recipe.stdout[-3000:] + recipe.stderr[-3000:]
    settings = json.loads((out / "mmpeft_config.json").read_text())
    assert settings["recipe"] == "llava_finetune" and (out / "adapter_model.safetensors").is_file()
    assert Path(settings["config"]["training"]["ds_config"]).name == "zero2.json"

    gen = _run(python, ["-m", "mmpeft.data_gen.make_llava_instruct", "--captions",
                        str(small_world / "coco" / "annotations" / "captions_train.json"), "--limit", "2",
                        "--dry-run", "--output", str(tmp_path / "gen.json")], tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "You write chat data" in gen.stdout  # the conversation prompt, read from the installed package data
