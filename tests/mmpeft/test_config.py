from pathlib import Path

import pytest

from mmpeft.config import fill, load_config
from mmpeft.tiny import fixture_problems

CONFIGS = sorted((Path(__file__).parents[2] / "recipes" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_config_loads_and_names_its_command(path):
    config = load_config(path)
    assert {"model", "data", "training"} <= set(config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and path.name in first  # the command that runs it
    assert isinstance(config["training"]["lr"], float)


def test_overrides_parse_values_as_a_user_writes_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training: {lr: 1e-3, steps: 10, name: a, flag: false}\nmodel: {lora: {r: 8}}\n")
    config = load_config(path, ["training.lr=3e-4", "training.steps=20", "training.flag=true", "model.lora.r=16",
                                "training.name=1.2.3"])
    assert config == {"training": {"lr": 3e-4, "steps": 20, "name": "1.2.3", "flag": True},
                      "model": {"lora": {"r": 16}}}


def test_every_bad_override_is_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training: {lr: 1.0e-3}\n")
    with pytest.raises(ValueError) as err:
        load_config(path, ["training.lrr=1", "nokey", "model.x=1"])
    message = str(err.value)
    assert "'training.lrr'" in message and "'nokey' is not key=value" in message and "'model.x'" in message


def test_fill_and_the_fixture_a_config_asks_for():
    config = {"data": {"path": "{world}/llava/train.json"}, "model": {"preset": "llava-1.5-7b"}}
    assert fill(config, world="/w")["data"]["path"] == "/w/llava/train.json"
    assert "no 'fixture: {name: tiny}' block" in fixture_problems(config)[0]
    assert fixture_problems({"model": {"preset": "llava-1.5-7b"}}) == []
    assert fixture_problems({**config, "fixture": {"name": "tiny", "cache": None}}) == []
    assert "fixture.name" in fixture_problems({"fixture": {"name": "huge"}})[0]
    assert "cash" in fixture_problems({"fixture": {"name": "tiny", "cash": "/c"}})[0]
