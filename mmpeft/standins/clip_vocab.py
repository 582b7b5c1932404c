"""CLIP's own byte-level BPE tokenizer, without a Hub download.

CLIP ships its merges as `bpe_simple_vocab_16e6.txt.gz` (openai/CLIP); the `open_clip_torch`
wheel on PyPI carries the same file, byte for byte. `clip_bpe_file` fetches that wheel once
with pip and keeps only the merges file, checked against its SHA-256, in
`<cache>/standins/clip-bpe/`. `clip_vocabulary` derives CLIP's 49,408-token vocabulary from
it as CLIP's own tokenizer does, and `write_clip_tokenizer` writes the `vocab.json` and
`merges.txt` that transformers' `CLIPTokenizer` reads, laid out as a CLIP repository or a
Stable Diffusion `tokenizer/` folder has them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

from mmpeft.standins.fetch import fetch_package_file, fetched_once
from mmpeft.tiny import cache_root

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # openai/CLIP clip/<BPE_FILE>
WHEEL_MEMBER = f"open_clip/{BPE_FILE}"
PINNED_VERSION = "3.3.0"  # open_clip_torch
# CLIP's tokenizer keeps the first 49,152 - 256 - 2 merges, so that the 256 byte symbols, the
# same with the end-of-word mark, the merges and the two special tokens make 49,408 tokens
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
MAX_LENGTH = 77
# ids CLIP's tokenizer gives (openai/CLIP and every port of it agree): checked after each write
KNOWN_IDS = {"a photo of a cat": [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID],
             "a photo of a dog": [BOS_ID, 320, 1125, 539, 320, 1929, EOS_ID]}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's (and CLIP's) reversible map from bytes to printable characters, in CLIP's
    order: the printable bytes first, as themselves, then the others as 256, 257, ..."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def clip_bpe_file(cache: str | Path | None = None, python: str = sys.executable) -> Path:
    """`<cache>/standins/clip-bpe/bpe_simple_vocab_16e6.txt.gz`, fetched on first use (see
    `fetch_clip_bpe`) and checked against CLIP's SHA-256 on every call. `cache` defaults to
    `$MMPEFT_CACHE`, else `~/.cache/mmpeft`."""
    folder = cache_root(str(cache) if cache else None, os.environ) / "standins" / "clip-bpe"
    path = folder / BPE_FILE
    fetched_once(folder, lambda: _intact(path), lambda: fetch_clip_bpe(folder, python=python))
    return path


def fetch_clip_bpe(folder: Path, version: str = PINNED_VERSION, python: str = sys.executable) -> None:
    """Extract CLIP's merges file from an open_clip_torch wheel into `folder`. A wheel already
    in `folder` (copied there by hand) is used as it is; otherwise `python -m pip download`
    fetches one (about 1.5 MB) into a temporary folder."""
    fetch_package_file(f"open_clip_torch=={version}", "open_clip_torch-*.whl", True, folder, "CLIP's BPE merges",
                       lambda wheel: _extract(wheel, folder), python)


def _extract(wheel: Path, folder: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(WHEEL_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheel} has no {WHEEL_MEMBER}; use open_clip_torch=={PINNED_VERSION}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        raise RuntimeError(f"{wheel}: {WHEEL_MEMBER} has SHA-256 {digest}, CLIP's merges file has {BPE_SHA256}")
    tmp = Path(folder) / f".{BPE_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, Path(folder) / BPE_FILE)


def _intact(path: Path) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == BPE_SHA256
    except OSError:
        return False


def clip_vocabulary(bpe_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """`(vocab, merges)` as CLIP's tokenizer builds them from its merges file: the file's
    first line names it and is skipped, the next `N_MERGES` lines are the merges; the
    vocabulary is the 256 byte symbols, the same with `</w>`, each merge's result in order,
    then `<|startoftext|>` (49406) and `<|endoftext|>` (49407)."""
    lines = gzip.decompress(Path(bpe_file).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(merges) != N_MERGES or len(vocab) != VOCAB_SIZE or (vocab[BOS], vocab[EOS]) != (BOS_ID, EOS_ID):
        raise ValueError(f"{bpe_file}: {len(merges)} merges and {len(vocab)} distinct tokens; CLIP has {N_MERGES} "
                         f"and {VOCAB_SIZE}, with {BOS} {BOS_ID} and {EOS} {EOS_ID}")
    return vocab, merges


def write_clip_tokenizer(folder: Path, cache: str | Path | None = None, pad_token: str = EOS,
                         tokenizer_json: bool = True):
    """Write CLIP's tokenizer into `folder` and return it as read back from there:
    `vocab.json`, `merges.txt`, `tokenizer_config.json` and `special_tokens_map.json` (the
    pad token set there, as the Hub's files set it: `<|endoftext|>` in CLIP's and SD 1.5's,
    `!` (id 0) in SD 2.x's), plus `tokenizer.json` when `tokenizer_json` (CLIP's
    repositories have one, Stable Diffusion's `tokenizer/` folders do not)."""
    from transformers import AutoTokenizer, CLIPTokenizer

    vocab, merges = clip_vocabulary(clip_bpe_file(cache))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS}
    config = {**specials, "pad_token": EOS, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({**specials, "pad_token": pad_token}, indent=2, sort_keys=True) + "\n")
    if tokenizer_json:
        built = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=MAX_LENGTH)
        built.backend_tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    wrong = [f"{text!r} encodes as {tokenizer(text)['input_ids']}, CLIP's ids are {ids}"
             for text, ids in KNOWN_IDS.items() if tokenizer(text)["input_ids"] != ids]
    if (len(tokenizer), tokenizer.pad_token, tokenizer.model_max_length) != (VOCAB_SIZE, pad_token, MAX_LENGTH):
        wrong.append(f"length/pad/max length are {len(tokenizer)}/{tokenizer.pad_token}/{tokenizer.model_max_length}")
    if wrong:
        raise ValueError(f"CLIP tokenizer at {folder}: {'; '.join(wrong)}")
    return tokenizer
