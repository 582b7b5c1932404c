"""A stand-in CLIP tokenizer: CLIP's byte-level BPE format, special tokens and ids, and
length limit, over a small vocabulary generated here (CLIP's own 49,408-token BPE is not
available offline). It encodes any text, but not into CLIP's real ids past the bytes."""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407  # CLIP's ids: the last two of its 49,408
# whole words given a token of their own (CLIP's vocabulary has each of them as "word</w>")
WORDS = ("a an the of and in on with to is are photo picture image this that there red green blue yellow "
         "white black circle square triangle cat dog man woman left right above below").split()

README = f"""# Stand-in for openai/clip-vit-large-patch14-336

Built by `mmpeft.standins.build` (see `standin.json` for every size that differs from the
real repository). The weights are random; the configuration is CLIP ViT-L/14-336's with only
depth and width cut (image size 336 and patch size 14 kept: 576 patch tokens and a class token).
`preprocessor_config.json` is CLIP's real preprocessing.

**The tokenizer is a stand-in.** CLIP's own BPE vocabulary (49,408 tokens) is not available
offline, so `vocab.json` and `merges.txt` hold a small generated vocabulary in the same
format: the 256 byte symbols, each also with the end-of-word mark `</w>`, whole-word tokens for
{len(WORDS)} common words, and CLIP's special tokens at CLIP's ids ({BOS} {BOS_ID}, {EOS} {EOS_ID},
padding with {EOS}); texts are cut at 77 tokens. Text ids from it are not CLIP's; do not compare
text features with the real model's.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's (and CLIP's) reversible map from bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """`(vocab, merges)`: byte symbols, byte symbols with `</w>`, then each word of `WORDS`
    built by merging left to right (as CLIP's `vocab.json` orders bytes, then merges), and
    the two special tokens at CLIP's ids."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1], *parts[2:]]
    vocab[BOS], vocab[EOS] = BOS_ID, EOS_ID
    return vocab, merges


def write_clip_tokenizer(folder: Path) -> None:
    """Write the stand-in's `vocab.json`, `merges.txt`, `tokenizer_config.json`,
    `special_tokens_map.json` and `README.md` into `folder`."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
                              model_max_length=77)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(README)
