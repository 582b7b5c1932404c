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


def _bin_only_copy(zoo, folder, extra=None):
    """The tiny LM as a checkpoint published before safetensors: config, tokenizer, pytorch_model.bin."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(zoo / "lm")
    lm.config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(zoo / "lm").save_pretrained(folder)
    # transformers 5 writes safetensors whatever save_pretrained is told, so the .bin is written by hand
    torch.save({**lm.state_dict(), **(extra or {})}, folder / "pytorch_model.bin")
    return lm


def test_an_lm_published_only_as_bin_loads_with_a_note(small_zoo, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from mmpeft.presets import load_pretrained

    original = _bin_only_copy(small_zoo[0], tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    notes = []
    lm, tokenizer = load_lm(resolve_preset("tiny", zoo_dir=small_zoo[0], lm=str(tmp_path)), log=notes.append)
    assert notes == [f"note: the LM of preset 'tiny' at {tmp_path} has no safetensors weights, so its "
                     "pytorch_model*.bin was read (torch.load with weights_only=True)"]
    for name, tensor in original.state_dict().items():
        assert torch.equal(lm.state_dict()[name], tensor), name
    assert tokenizer("Red.").input_ids
    quiet = []
    load_lm(resolve_preset("tiny", zoo_dir=small_zoo[0]), log=quiet.append)  # the zoo's safetensors: no note
    assert quiet == []
    with pytest.raises(OSError, match="model.safetensors"):  # what mmpeft.load asks of a base still holds
        load_pretrained(str(tmp_path), AutoModelForCausalLM.from_pretrained, use_safetensors=True)


class _RunsCode:
    def __reduce__(self):
        return print, ("a pickle ran code",)


def test_bin_weights_are_read_as_tensors_only(small_zoo, tmp_path, capsys):
    import pickle

    _bin_only_copy(small_zoo[0], tmp_path, extra={"payload": _RunsCode()})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_lm(resolve_preset("tiny", zoo_dir=small_zoo[0], lm=str(tmp_path)))
    assert "a pickle ran code" not in capsys.readouterr().out
