"""CLIP's real BPE tokenizer derived from CLIP's merges file (fetched once from the
open_clip_torch wheel): CLIP's ids, CLIP's and Stable Diffusion's layouts, and the cache."""

import gzip
import json
import zipfile

import pytest

from mmpeft.standins.clip_vocab import (
    BPE_FILE,
    N_MERGES,
    WHEEL_MEMBER,
    clip_bpe_file,
    clip_vocabulary,
    fetch_clip_bpe,
    write_clip_tokenizer,
)

# ids CLIP's tokenizer gives, as published by ports of it (Bumblebee, rclip, ...)
KNOWN = {"a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
         "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
         "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
         "A PHOTO of  a Cat!": [49406, 320, 1125, 539, 320, 2368, 256, 49407]}


@pytest.fixture(scope="module")
def bpe():
    return clip_bpe_file()


def test_vocabulary_is_clips_bytes_then_merges_then_the_special_tokens(bpe):
    vocab, merges = clip_vocabulary(bpe)
    assert len(vocab) == 49408 and len(merges) == N_MERGES == 48894
    assert (vocab["!"], vocab["~"], vocab["!</w>"], vocab["a</w>"]) == (0, 93, 256, 320)
    assert merges[0] == ("i", "n") and vocab["in"] == 512  # the first merge follows the 512 byte symbols
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (49406, 49407)
    assert max(vocab.values()) == 49407 and sorted(vocab.values()) == list(range(49408))


def test_clip_layout_gives_clips_ids(tmp_path, bpe):
    tokenizer = write_clip_tokenizer(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"vocab.json", "merges.txt", "tokenizer.json",
                                                    "tokenizer_config.json", "special_tokens_map.json"}
    for text, ids in KNOWN.items():
        assert tokenizer(text).input_ids == ids, text
    assert tokenizer(["a cat"], padding="max_length", max_length=6).input_ids == [[49406, 320, 2368] + [49407] * 3]
    assert len(tokenizer("word " * 100, truncation=True).input_ids) == 77
    lines = (tmp_path / "merges.txt").read_text().splitlines()
    assert lines[0] == "#version: 0.2" and lines[1] == "i n" and len(lines) == 1 + N_MERGES


def test_stable_diffusion_2_layout_pads_with_exclamation_mark(tmp_path, bpe):
    tokenizer = write_clip_tokenizer(tmp_path, pad_token="!", tokenizer_json=False)
    assert not (tmp_path / "tokenizer.json").exists()
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["pad_token"] == "!"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["pad_token"] == "<|endoftext|>"
    assert tokenizer(["a cat"], padding="max_length", max_length=6).input_ids == [[49406, 320, 2368, 49407, 0, 0]]
    # "!" is a special token here, so transformers matches it whole: id 0, not CLIP's "!</w>" 256
    assert tokenizer("Hello, world!").input_ids == [49406, 3306, 267, 1002, 0, 49407]


def test_a_failed_download_names_the_command_to_run_elsewhere(tmp_path):
    with pytest.raises(RuntimeError) as err:
        fetch_clip_bpe(tmp_path, version="3.3.0", python="false")  # `false` stands in for a pip that cannot reach PyPI
    message = str(err.value)
    assert "pip download --no-deps --only-binary :all: open_clip_torch==3.3.0 -d DIR" in message
    assert str(tmp_path) in message and not (tmp_path / BPE_FILE).exists()


def test_a_wheel_copied_into_the_folder_is_used_without_pip_and_checked(tmp_path, bpe):
    folder = tmp_path / "standins" / "clip-bpe"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "open_clip_torch-9.9.9-py3-none-any.whl", "w") as wheel:
        wheel.writestr(WHEEL_MEMBER, bpe.read_bytes())
    assert clip_bpe_file(tmp_path, python="false") == folder / BPE_FILE
    assert (folder / BPE_FILE).read_bytes() == bpe.read_bytes()
    (folder / BPE_FILE).write_bytes(b"changed")  # a damaged file is extracted again
    assert clip_bpe_file(tmp_path, python="false").read_bytes() == bpe.read_bytes()

    other = tmp_path / "other" / "standins" / "clip-bpe"
    other.mkdir(parents=True)
    with zipfile.ZipFile(other / "open_clip_torch-9.9.9-py3-none-any.whl", "w") as wheel:
        wheel.writestr(WHEEL_MEMBER, gzip.compress(b'"bpe_simple_vocab_16e6.txt#version: 0.2\ni n\n'))
    with pytest.raises(RuntimeError, match="SHA-256"):
        clip_bpe_file(tmp_path / "other", python="false")
