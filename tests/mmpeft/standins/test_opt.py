"""The OPT-6.7B stand-in: OPT's layout (sharded `.bin`, no safetensors), a tied head over
50,272 rows for 50,265 tokens, OPT's special tokens, and GPT-2's merges."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmpeft.presets import load_pretrained
from mmpeft.standins.opt import build_opt


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("standins") / "facebook" / "opt-6.7b"
    build_opt(folder)
    return folder


def test_layout_is_the_repositorys(opt):
    assert {p.name for p in opt.iterdir()} == {
        "config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
        "standin.json"}
    config = json.loads((opt / "config.json").read_text())
    assert (config["vocab_size"], config["tie_word_embeddings"], config["dropout"], config["pad_token_id"],
            config["bos_token_id"], config["max_position_embeddings"]) == (50272, True, 0.1, 1, 2, 2048)
    record = json.loads((opt / "standin.json").read_text())
    assert record["stands_in_for"] == "facebook/opt-6.7b" and record["cut"]["hidden_size"] == {
        "real": 4096, "standin": 64}


def test_bin_weights_load_with_a_note_and_the_head_is_tied(opt):
    notes = []
    lm = load_pretrained(str(opt), AutoModelForCausalLM.from_pretrained, what="LM", log=notes.append)
    assert len(notes) == 1 and "pytorch_model*.bin was read" in notes[0]
    assert lm.dtype == torch.float16 and lm.get_input_embeddings().weight.shape == (50272, 64)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    index = json.loads((opt / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert set(index.values()) == {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"}
    assert "lm_head.weight" not in index  # tied: written once, as the embeddings


def test_tokenizer_has_opts_special_tokens_and_gpt2s_merges(opt):
    tokenizer = AutoTokenizer.from_pretrained(opt)
    assert len(tokenizer) == 50265
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "</s>", "<pad>")
    ids = tokenizer("Hello world")["input_ids"]
    assert ids[0] == 2 and tokenizer.convert_ids_to_tokens(ids[1:]) == ["Hello", "Ġworld"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"
