"""Starting a recipe prints nothing a user cannot act on: importing the recipes, the data tool
and the tiny zoo's CLIP writes nothing to stderr."""

import logging
import os
import subprocess
import sys

from mmpeft.models.quant import BNB_CPU_OPS_LOGGER, quiet_bitsandbytes_import

MODULES = ["mmpeft.recipes.llava_finetune", "mmpeft.recipes.minigpt5_stage2", "mmpeft.recipes.gill",
           "mmpeft.data_gen.make_llava_instruct", "mmpeft.tiny.zoo.clip"]


def test_importing_the_recipes_prints_nothing(tmp_path):
    # from an empty folder, so the imports come from the installed package, not the clone
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", f"import {', '.join(MODULES)}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # e.g. bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (mmpeft/models/quant.py),
    # transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..."
    assert proc.stderr == "", proc.stderr


def test_only_the_kernels_note_is_dropped_from_bitsandbytes_logs():
    quiet_bitsandbytes_import()
    logger = logging.getLogger(BNB_CPU_OPS_LOGGER)
    note = logging.makeLogRecord({"name": BNB_CPU_OPS_LOGGER, "levelno": logging.WARNING, "args": ("x",),
                                  "msg": "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please "
                                         "make sure you already `pip install kernels` and the kernels >= 0.11.1"})
    other = logging.makeLogRecord({"name": BNB_CPU_OPS_LOGGER, "levelno": logging.WARNING,
                                   "msg": "Failed to load CPU int8 kernel"})
    assert not logger.filter(note)
    assert logger.filter(other)
    assert logger.getEffectiveLevel() <= logging.WARNING
