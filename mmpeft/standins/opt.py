"""A stand-in for `facebook/opt-6.7b`, GILL's LM: OPT-6.7B's config with only depth and width
cut, random seeded weights in float16, its weights as sharded `pytorch_model-*.bin` files
(the repository has no safetensors), and a tokenizer with OPT's conventions.

The tokenizer is GPT-2's byte-level BPE (the merges OPT uses) laid out with OPT's special
tokens: `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, every text starting with `</s>` as its BOS,
50,265 tokens in all, and 50,272 embedding rows tied to the output head. OPT numbers the
ordinary tokens in the order of fairseq's dictionary, which is not available offline; here
they keep GPT-2's order, shifted by 4. Token boundaries are OPT's, the ids of ordinary text
are not (`standin.json` says so).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmpeft.standins.record import diff, record, sizes
from mmpeft.standins.tokenizers import gpt2_tokenizer

OPT = "facebook/opt-6.7b"
SEED = 0

# facebook/opt-6.7b's config.json
OPT_REAL = dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                word_embed_proj_dim=4096)
OPT_CUT = dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64)
OPT_FIXED = dict(vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True, dropout=0.1,
                 attention_dropout=0.0, activation_function="relu", enable_bias=True,
                 layer_norm_elementwise_affine=True, init_std=0.02, layerdrop=0.0, bos_token_id=2, eos_token_id=2,
                 pad_token_id=1, tie_word_embeddings=True, use_cache=True, prefix="</s>")
OPT_GENERATION = dict(bos_token_id=2, eos_token_id=2, pad_token_id=1)

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0..3
FILLERS = ("madeupword0000", "madeupword0001", "madeupword0002", "<mask>")  # fairseq's, ids 50261..50264
N_TOKENS = 50265
SHARDS = 2  # pytorch_model-00001-of-00002.bin, -00002-of-00002.bin


def opt_vocabulary(vocab_cache: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the stand-in tokenizer: OPT's special tokens at 0..3, GPT-2's
    50,257 tokens at 4..50,260 in GPT-2's order, fairseq's filler words and `<mask>` last."""
    model = json.loads(gpt2_tokenizer(vocab_cache).backend_tokenizer.to_str())["model"]
    gpt2 = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab |= {t: len(SPECIALS) + i for t, i in gpt2}
    vocab |= {t: len(vocab) + k for k, t in enumerate(FILLERS)}
    if len(vocab) != N_TOKENS:
        raise ValueError(f"OPT stand-in vocabulary has {len(vocab)} tokens, OPT has {N_TOKENS}")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return vocab, merges


def opt_tokenizer(folder: Path, vocab_cache: str | Path | None = None):
    """Write `vocab.json`, `merges.txt` and OPT's tokenizer settings into `folder` and return
    the tokenizer read back from it."""
    from transformers import AutoTokenizer, GPT2Tokenizer

    vocab, merges = opt_vocabulary(vocab_cache)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = GPT2Tokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                              bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>",
                              add_bos_token=True, add_prefix_space=False, errors="replace")
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)  # the repository has vocab.json and merges.txt only
    config = {"add_bos_token": True, "add_prefix_space": False, "bos_token": "</s>", "eos_token": "</s>",
              "unk_token": "</s>", "pad_token": "<pad>", "errors": "replace", "model_max_length": 2048,
              "tokenizer_class": "GPT2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}, indent=2) + "\n")
    read = AutoTokenizer.from_pretrained(folder)
    wrong = []
    if read("a")["input_ids"][0] != 2:
        wrong.append(f"'a' encodes as {read('a')['input_ids']}: OPT puts </s> (2) first")
    if (read.pad_token_id, read.eos_token_id, len(read)) != (1, 2, N_TOKENS):
        wrong.append(f"pad/eos/length are {read.pad_token_id}/{read.eos_token_id}/{len(read)}, expected "
                     f"1/2/{N_TOKENS}")
    if wrong:
        raise ValueError(f"OPT stand-in tokenizer at {folder}: {'; '.join(wrong)}")
    return read


def build_opt(folder: Path, full_size: bool = False, vocab_cache: str | Path | None = None) -> None:
    """`facebook/opt-6.7b`'s layout: `OPTForCausalLM` in float16 with tied embeddings,
    sharded `.bin` weights and an index, its generation config and the tokenizer above."""
    from transformers import GenerationConfig, OPTConfig, OPTForCausalLM

    torch.manual_seed(SEED)
    config = OPTConfig(**sizes(OPT_REAL, OPT_CUT, full_size), **OPT_FIXED)
    config.architectures = ["OPTForCausalLM"]
    lm = OPTForCausalLM(config).to(torch.float16).eval()
    folder.mkdir(parents=True, exist_ok=True)
    config.dtype = torch.float16
    config.save_pretrained(folder)
    GenerationConfig(**OPT_GENERATION).save_pretrained(folder)
    _save_bin_shards(lm, folder)
    opt_tokenizer(folder, vocab_cache)
    record(folder, OPT, diff(OPT_REAL, OPT_CUT), full_size, SEED, [
        "weights: random, float16, as pytorch_model-0000{1,2}-of-00002.bin (the repository has no safetensors)",
        "tokenizer: GPT-2's BPE merges with OPT's special tokens (<s> 0, <pad> 1, </s> 2, <unk> 3, </s> as BOS) "
        "and 50,265 tokens, but ordinary tokens in GPT-2's order shifted by 4, not fairseq's order: the ids of "
        "ordinary text differ from OPT's, the token boundaries do not"])


def _save_bin_shards(model, folder: Path) -> None:
    """The state dict (tied head left out, as transformers writes it) in `SHARDS` `.bin`
    files split by parameter order, with `pytorch_model.bin.index.json`."""
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = list(state)
    cut = (len(names) + 1) // SHARDS
    weight_map, total = {}, 0
    for k in range(SHARDS):
        shard = f"pytorch_model-{k + 1:05d}-of-{SHARDS:05d}.bin"
        part = {n: state[n] for n in names[k * cut:(k + 1) * cut]}
        torch.save(part, folder / shard)
        weight_map |= dict.fromkeys(part, shard)
        total += sum(t.numel() * t.element_size() for t in part.values())
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
