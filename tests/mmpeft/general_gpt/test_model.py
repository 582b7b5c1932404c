import json

import pytest
import torch

from mmpeft.data.embeddings import EmbeddingTextDataset, collate_embedding_texts, read_embedding_set, save_embedding_set
from mmpeft.general_gpt.model import GeneralGPT, add_general_gpt_tokens, encode_sample, retrieval_prompt
from mmpeft.presets import load_lm, resolve_preset


@pytest.fixture
def general(small_zoo):
    lm, tokenizer = load_lm(resolve_preset("tiny", zoo_dir=small_zoo[0]))
    ids = add_general_gpt_tokens(tokenizer, lm)
    torch.manual_seed(0)
    return GeneralGPT(lm, ids, 12), tokenizer


def test_the_mse_reads_the_last_layer_state_at_clip_out(general):
    model, tokenizer = general
    sample = encode_sample(tokenizer, "retrieval", "a red square", 64)
    ids = torch.tensor([sample["input_ids"]])
    tokens = tokenizer.convert_ids_to_tokens(sample["input_ids"])
    assert tokens[-3:] == ["[CLIP OUT]", "[\\CLIP OUT]", tokenizer.eos_token]
    assert sample["labels"] == sample["input_ids"]
    assert retrieval_prompt(tokenizer, "a red square") == sample["input_ids"][:-2]
    target = torch.randn(1, 12)
    out = model(ids, torch.ones_like(ids), torch.tensor([sample["labels"]]), vectors_out=target)
    with torch.no_grad():
        hidden = model.lm(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    at = len(sample["input_ids"]) - 3  # [CLIP OUT], not the closing token after it
    expected = torch.nn.functional.mse_loss(model.embed_out(hidden[0, at]), target[0])
    assert out["mse_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["lm_loss"].item() + expected.item(), rel=1e-5)


def test_the_vector_enters_at_emb_and_carries_no_loss(general):
    model, tokenizer = general
    sample = encode_sample(tokenizer, "caption", "a red square", 64)
    tokens = tokenizer.convert_ids_to_tokens(sample["input_ids"])
    slot = tokens.index("<emb>")
    assert tokens[:3] == ["[CLIP IN]", "<emb>", "[\\CLIP IN]"] and sample["labels"][slot] == -100
    ids, vector = torch.tensor([sample["input_ids"]]), torch.randn(1, 12)
    embeds = model.input_embeddings(ids, vector)
    plain = model.lm.get_input_embeddings()(ids)
    assert torch.allclose(embeds[0, slot], model.embed_in(vector)[0])
    assert torch.equal(embeds[0, :slot], plain[0, :slot]) and torch.equal(embeds[0, slot + 1:], plain[0, slot + 1:])
    with pytest.raises(ValueError, match="1 <emb> slot.s. but 0 input vector"):
        model.input_embeddings(ids, None)
    sentence = encode_sample(tokenizer, "sentence", "a red square", 64)
    assert tokenizer.convert_ids_to_tokens(sentence["input_ids"])[0] == "<emb>" and sentence["labels"][0] == -100


def test_a_batch_pairs_each_vector_with_its_slot_or_out_token(general):
    _, tokenizer = general
    vectors = torch.arange(3 * 12, dtype=torch.float).view(3, 12)
    data = EmbeddingTextDataset(vectors, [("a red square", 2), ("two blue circles", 0)], ["caption", "retrieval"],
                                lambda task, text: encode_sample(tokenizer, task, text, 64))
    batch = collate_embedding_texts(tokenizer.pad_token_id)([data[k] for k in range(len(data))])
    assert torch.equal(batch["vectors_in"], vectors[[2, 0]]) and torch.equal(batch["vectors_out"], vectors[[2, 0]])


def test_an_embedding_set_names_the_bad_line(tmp_path):
    save_embedding_set(tmp_path, torch.randn(2, 4), [("a", 0), ("b", 1)])
    vectors, texts = read_embedding_set(tmp_path)
    assert vectors.shape == (2, 4) and texts == [("a", 0), ("b", 1)]
    lines = [json.dumps({"text": "a", "row": 0}), json.dumps({"text": "c", "row": 5})]
    (tmp_path / "texts.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"texts.jsonl line 2: row 5 is not a row of the 2 vectors"):
        read_embedding_set(tmp_path)
    with pytest.raises(FileNotFoundError, match="no vectors.safetensors"):
        read_embedding_set(tmp_path / "missing")
