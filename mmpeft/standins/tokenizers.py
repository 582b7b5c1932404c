"""The real Llama-2 and GPT-2 tokenizers, without a Hub download.

llama-cpp-python's source distribution carries llama.cpp's vocabulary-only GGUF files
(`vendor/llama.cpp/models/ggml-vocab-*.gguf`), each with test strings (`.inp`) and the ids
llama.cpp's tokenizer gives them (`.out`). `vocab_folder` fetches that sdist once with pip,
keeps only the files named in `VOCAB_FILES` in `<cache>/standins/vocab/`, and writes a
marker; transformers reads the GGUF vocabularies directly (`gguf_file=`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
import tarfile
from pathlib import Path

from mmpeft.standins.fetch import fetch_package_file, fetched_once
from mmpeft.tiny import cache_root

LLAMA_SPM = "ggml-vocab-llama-spm.gguf"  # Llama-2's SentencePiece vocabulary (Vicuna v1.5, LLaVA-1.5)
GPT2_BPE = "ggml-vocab-gpt-2.gguf"
VOCAB_FILES = tuple(v + ext for v in (LLAMA_SPM, GPT2_BPE) for ext in ("", ".inp", ".out"))
PINNED_VERSION = "0.3.36"  # used when llama-cpp-python is not installed
MARKER = "complete.json"
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"  # ends every test string in a `.inp` file


def vocab_folder(cache: str | Path | None = None, python: str = sys.executable) -> Path:
    """`<cache>/standins/vocab/` with the files of `VOCAB_FILES`, fetched on first use
    (see `fetch_vocabs`). `cache` defaults to `$MMPEFT_CACHE`, else `~/.cache/mmpeft`."""
    folder = cache_root(str(cache) if cache else None, os.environ) / "standins" / "vocab"
    fetched_once(folder, lambda: _complete(folder), lambda: fetch_vocabs(folder, python=python))
    return folder


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version, whose sdist holds the same vocabularies;
    `PINNED_VERSION` when it is not installed."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return PINNED_VERSION


def fetch_vocabs(folder: Path, version: str | None = None, python: str = sys.executable) -> None:
    """Extract `VOCAB_FILES` from llama-cpp-python's sdist into `folder`, then write the
    marker. An sdist already in `folder` (copied there by hand) is used as it is; otherwise
    `python -m pip download` fetches one (tens of MB) into a temporary folder."""
    version = version or llama_cpp_version()
    fetch_package_file(f"llama-cpp-python=={version}", "llama_cpp_python-*.tar.gz", False, folder,
                       "the Llama-2 / GPT-2 vocabularies", lambda sdist: _extract(sdist, folder), python)


def _extract(sdist: Path, folder: Path) -> None:
    wanted = {f"/vendor/llama.cpp/models/{name}": name for name in VOCAB_FILES}
    digests = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = next((n for suffix, n in wanted.items() if member.name.endswith(suffix)), None)
            if name is None or not member.isfile():
                continue
            data = tar.extractfile(member).read()
            _write_atomic(folder / name, data)
            digests[name] = hashlib.sha256(data).hexdigest()
    missing = sorted(set(VOCAB_FILES) - set(digests))
    if missing:
        raise RuntimeError(f"{sdist} lacks vendor/llama.cpp/models/{{{', '.join(missing)}}}; "
                           f"use a llama-cpp-python sdist that ships them (e.g. {PINNED_VERSION})")
    _write_atomic(folder / MARKER, json.dumps({"sdist": sdist.name, "sha256": digests}, indent=1).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _complete(folder: Path) -> bool:
    try:
        digests = json.loads((folder / MARKER).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return False
    return set(digests) == set(VOCAB_FILES) and all(
        (folder / n).is_file() and hashlib.sha256((folder / n).read_bytes()).hexdigest() == d
        for n, d in digests.items())


def reference_encodings(folder: Path, vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test strings for `vocab` with the ids its tokenizer gives them, no BOS
    (`<vocab>.inp`: each string followed by a line `__ggml_vocab_test__`; `<vocab>.out`: one
    line of ids per string)."""
    # bytes, not text mode: the strings hold "\r" that universal newlines would rewrite
    texts = (folder / f"{vocab}.inp").read_bytes().decode("utf-8").split(TEST_SEPARATOR)
    lines = (folder / f"{vocab}.out").read_bytes().decode("utf-8").split("\n")
    if texts[-1] != "" or lines[-1] != "" or len(texts) != len(lines):
        raise ValueError(f"{folder / vocab}.inp/.out: {len(texts) - 1} strings but {len(lines) - 1} lines of ids")
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts[:-1], lines[:-1], strict=True)]


def llama2_tokenizer(cache: str | Path | None = None):
    """Llama-2's tokenizer (Vicuna v1.5's, LLaVA-1.5's) as Vicuna v1.5's tokenizer_config
    sets it up: `<s>` (1) put in front, `</s>` (2) not appended, `<unk>` 0, `legacy` false,
    so the SentencePiece dummy prefix goes only at the start of a text and not after a
    special token (`</s>USER` is `</s>`, `USER`). Its pad token is `<unk>`, on the right, as
    LLaVA's train.py sets it (Vicuna's own config has none).

    One known difference from sentencepiece (and llama.cpp): a text that starts with a space
    gets no extra `▁`; `tokenizer(" " + text)` gives sentencepiece's ids for `text`."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vocab_folder(cache), gguf_file=LLAMA_SPM, padding_side="right",
                                              model_max_length=4096)
    # legacy=False as in transformers' Llama converter, whatever the GGUF reader chose
    tokenizer.backend_tokenizer.normalizer = None
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                                         split=False)
    tokenizer.pad_token = tokenizer.unk_token
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2}
    found = {t: tokenizer.convert_tokens_to_ids(t) for t in expected}
    wrong = [f"{t} is {found[t]}, expected {i}" for t, i in expected.items() if found[t] != i]
    if (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) != ("<s>", "</s>", "<unk>"):
        wrong.append(f"bos/eos/unk are {tokenizer.bos_token}/{tokenizer.eos_token}/{tokenizer.unk_token}")
    if tokenizer("a")["input_ids"][:1] != [1] or tokenizer("a")["input_ids"][-1] == 2:
        wrong.append(f"'a' encodes as {tokenizer('a')['input_ids']}: <s> must lead, </s> must not end")
    if wrong:
        raise ValueError(f"{LLAMA_SPM}: not Llama-2's tokenizer: {'; '.join(wrong)}")
    return tokenizer


def gpt2_tokenizer(cache: str | Path | None = None):
    """GPT-2's byte-level BPE tokenizer (`<|endoftext|>` 50256 for BOS, EOS and UNK)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vocab_folder(cache), gguf_file=GPT2_BPE)
