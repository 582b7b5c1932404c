"""Frozen parts: which modules run in eval mode while the rest trains, the loop keeping them
there, and the start-up check that no frozen part keeps random weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmpeft.models.trainable import (
    LoraSettings,
    PartOrigin,
    apply_trainability,
    check_frozen_parts_loaded,
    frozen_modules,
)
from mmpeft.train.modes import train_mode


class Connector(nn.Module):
    def __init__(self):
        super().__init__()
        self.qformer = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        self.projection = nn.Linear(4, 4)

    def forward(self, x):
        return self.projection(self.qformer(x))


class Toy(nn.Module):
    """A frozen tower with dropout, a Q-Former-like connector whose projection alone trains,
    an LM part and new token rows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tower = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        self.connector = Connector()
        self.llm = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Dropout(0.5))

    def forward(self, x):
        return self.llm[1](self.connector(self.tower(x)))

    def prepare_inputs_for_generation(self, *args, **kwargs):  # PEFT's causal-LM wrapper asks for it
        return kwargs


def _parts(model: Toy) -> dict:
    return {"tower": model.tower, "connector": model.connector, "projection": model.connector.projection,
            "llm": model.llm}


def _names(model, modules) -> list[str]:
    names = {id(m): n.removeprefix("base_model.model.") for n, m in model.named_modules()}
    return [names[id(m)] for m in modules]


def test_frozen_parts_are_listed_and_lora_parts_are_not():
    toy = Toy()
    parts, choice = _parts(toy), {"tower": "frozen", "connector": "full", "llm": "lora"}
    model = apply_trainability(toy, parts, choice, LoraSettings(r=2, alpha=4, dropout=0.5, targets="all-linear"))
    # the projection, not named, sits inside the trained connector: not frozen
    assert _names(model, frozen_modules(parts, choice)) == ["tower"]


def test_an_lm_frozen_but_for_its_token_rows_counts_as_frozen():
    toy = Toy()
    parts, choice = _parts(toy), {"tower": "frozen", "connector": "full", "llm": "frozen"}
    model = apply_trainability(toy, parts, choice, token_rows={"llm.0": [8, 9]})
    assert any(p.requires_grad for p in toy.llm.parameters())  # the rows train
    assert _names(model, frozen_modules(parts, choice)) == ["tower", "llm"]


@pytest.mark.parametrize("llm", ["frozen", "lora"])
def test_a_frozen_part_holding_a_trained_one_is_split_around_it(llm):
    # with a LoRA LM the trained projection becomes PEFT's modules_to_save copy beside the original
    toy = Toy()
    parts, choice = _parts(toy), {"tower": "frozen", "connector": "frozen", "projection": "full", "llm": llm}
    model = apply_trainability(toy, parts, choice, LoraSettings(r=2, alpha=4, dropout=0.5, targets="all-linear"))
    expected = ["tower", "connector.qformer"] + (["llm"] if llm == "frozen" else [])
    assert _names(model, frozen_modules(parts, choice)) == expected
    train_mode(model, frozen_modules(parts, choice))
    modes = {n.removeprefix("base_model.model."): m.training for n, m in model.named_modules()}
    assert not modes["connector.qformer.1"] and not modes["tower.1"]
    assert all(mode for name, mode in modes.items() if name.startswith("connector.projection"))
    if llm == "lora":
        assert modes["llm.1.lora_dropout.default"] and modes["llm.2"]


def test_train_mode_puts_frozen_modules_in_eval_mode_and_the_rest_in_train_mode():
    toy = Toy().eval()
    train_mode(toy, [toy.tower, toy.connector.qformer])
    assert toy.training and toy.connector.training and toy.llm[2].training
    assert not toy.tower[1].training and not toy.connector.qformer[1].training


# --- in the loop ---

_RUN = """
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from test_frozen import Toy, _parts
from mmpeft.models.trainable import LoraSettings, apply_trainability, frozen_modules
from mmpeft.train.loop import TrainConfig, train

seen = {}
for how in ("frozen", "none"):
    toy = Toy()
    parts, choice = _parts(toy), {"tower": "frozen", "connector": "frozen", "projection": "full", "llm": "lora"}
    model = apply_trainability(toy, parts, choice, LoraSettings(r=2, alpha=4, dropout=0.5, targets="all-linear"))
    probe, lora_dropout = torch.randn(64, 4), toy.llm[1].lora_dropout["default"]

    def forward(engine, batch, steps=seen.setdefault(how, [])):
        steps.append({"tower_repeats": torch.equal(toy.tower(probe), toy.tower(probe)),
                      "qformer_repeats": torch.equal(toy.connector.qformer(probe), toy.connector.qformer(probe)),
                      "lora_dropout_repeats": torch.equal(lora_dropout(probe), lora_dropout(probe))})
        return {"loss": toy(batch["x"]).pow(2).mean()}

    def export(out, is_main, model=model):
        model.eval()  # as an evaluation in between would leave it

    data = [{"x": torch.randn(4)} for _ in range(8)]
    cfg = TrainConfig(f"{sys.argv[1]}/{how}", max_steps=3, micro_batch_size=2, save_steps=1, ds_config=None,
                      log_steps=100)
    train(model, data, lambda rows: {"x": torch.stack([r["x"] for r in rows])}, cfg, forward, export,
          lengths=[1] * 8, has_image=[True] * 8, log=lambda *_: None,
          frozen=frozen_modules(parts, choice) if how == "frozen" else ())
json.dump(seen, open(f"{sys.argv[1]}/seen.json", "w"))
"""


def test_the_loop_keeps_frozen_modules_in_eval_mode_at_every_step_and_lora_dropout_on(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _RUN, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    # one micro-batch a step; steps 2 and 3 follow a checkpoint whose export put the model in eval mode
    assert [len(steps) for steps in seen.values()] == [3, 3]
    for how, steps in seen.items():
        for step in steps:
            assert not step["lora_dropout_repeats"], how  # LoRA's dropout draws anew at every step
            # frozen: the tower and the Q-Former give the same output twice; without `frozen`, dropout draws anew
            assert step["tower_repeats"] == step["qformer_repeats"] == (how == "frozen"), how


# --- random frozen parts ---

CONNECTOR_FIX = "give model.init_connector=<a LLaVA stage-1 output>"


def _origin(part="connector", frozen=True, source=None):
    return PartOrigin(part, f"model.trainable.{part}", frozen, source, CONNECTOR_FIX)


def test_a_frozen_part_with_random_weights_stops_and_every_one_is_named():
    with pytest.raises(ValueError) as err:
        check_frozen_parts_loaded([_origin(), _origin("tower", source="clip"), _origin("llm", frozen=False),
                                   PartOrigin("mapper.mlp", "model.mapper_trainable.mlp", True, None,
                                              "give model.init_from=<a stage-1 output>")])
    lines = str(err.value).splitlines()
    assert lines[1:] == [
        f"model.trainable.connector is frozen but the connector is random: {CONNECTOR_FIX}, or train it "
        "(model.trainable.connector: full), or list connector in model.allow_random_frozen to train with it random "
        "all the same",
        "model.mapper_trainable.mlp is frozen but the mapper's mlp is random: give model.init_from=<a stage-1 "
        "output>, or train it (model.mapper_trainable.mlp: full), or list mapper.mlp in model.allow_random_frozen "
        "to train with it random all the same"]


def test_loaded_trained_or_allowed_parts_pass():
    check_frozen_parts_loaded([_origin(source="outputs/stage1"), _origin(frozen=False), _origin("projection")],
                              allowed=["projection"])
