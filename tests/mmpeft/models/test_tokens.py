"""New token rows start at the mean of the base vocabulary's rows, also on a vocabulary
padded past its tokenizer (OPT), and a rebuild from the saved tokenizer gives the same rows."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from mmpeft.models.tokens import add_tokens


def _tokenizer(n: int):
    vocab = {f"t{i}": i for i in range(n)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0")


def _lm(rows: int):
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=rows, hidden_size=8, ffn_dim=16, num_hidden_layers=1,
                                    num_attention_heads=2, word_embed_proj_dim=8, max_position_embeddings=16))


def test_padded_vocabulary_new_rows_skip_the_padding_rows_and_a_rebuild_agrees(tmp_path):
    tokenizer, lm = _tokenizer(10), _lm(12)  # 10 tokens, 12 rows: rows 10 and 11 are padding
    padding = lm.get_input_embeddings().weight[10:12].clone()
    ids = add_tokens(tokenizer, lm, ["<a>", "<b>", "<c>"])
    weight = lm.get_input_embeddings().weight
    assert ids == [10, 11, 12] and weight.shape == (13, 8)
    mean = weight[:10].mean(0)
    for i in ids:  # the two that land on padding rows too
        torch.testing.assert_close(weight[i], mean)
    assert not torch.allclose(padding[0], mean)
    assert lm.get_output_embeddings().weight is weight  # tied: one matrix

    tokenizer.save_pretrained(tmp_path)
    rebuilt = _lm(12)
    again = add_tokens(AutoTokenizer.from_pretrained(tmp_path), rebuilt, ["<a>", "<b>", "<c>"], base_tokens=10)
    assert again == ids
    torch.testing.assert_close(rebuilt.get_input_embeddings().weight, weight)


def test_existing_tokens_keep_their_rows():
    tokenizer, lm = _tokenizer(10), _lm(10)
    add_tokens(tokenizer, lm, ["<a>"])
    with torch.no_grad():
        lm.get_input_embeddings().weight[10] = 5.0  # a trained row
    assert add_tokens(tokenizer, lm, ["<a>"]) == [10]
    assert torch.all(lm.get_input_embeddings().weight[10] == 5.0)
