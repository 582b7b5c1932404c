import pytest

from mmpeft.presets import PRESETS, load_lm, resolve_preset


def test_real_presets_name_the_papers_models():
    assert PRESETS["llava-1.5-7b"].lm == "lmsys/vicuna-7b-v1.5"
    assert PRESETS["llava-1.5-7b"].clip == "openai/clip-vit-large-patch14-336"
    assert PRESETS["minigpt5"].diffusion == "stabilityai/stable-diffusion-2-1-base"
    assert PRESETS["gill"].lm == "facebook/opt-6.7b"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="llava-1.5-7b"):
        resolve_preset("llava-2")


def test_override_replaces_one_part(tmp_path):
    preset = resolve_preset("llava-1.5-7b", lm=str(tmp_path))
    assert preset.lm == str(tmp_path) and preset.clip == "openai/clip-vit-large-patch14-336"


def test_tiny_preset_needs_a_zoo_folder():
    with pytest.raises(ValueError, match="zoo"):
        resolve_preset("tiny")


def test_missing_model_error_names_preset_source_and_offline_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as err:
        load_lm(resolve_preset("llava-1.5-7b"))
    text = str(err.value)
    assert "llava-1.5-7b" in text and "lmsys/vicuna-7b-v1.5" in text and "--lm_path" in text
