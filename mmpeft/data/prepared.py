"""Training conversations prepared once and kept on disk: tokenized, labelled and checked by
every rank in parallel, reused by every later run of the same data and settings, and read
back lazily, so neither the start-up time of a later run nor a rank's memory grows with
the record count.

A prepared set is a folder named by what its tokens depend on: the data files as they are
on disk (path, size, modification time), the tokenizer, the conversation format, the image
token and its run length, `max_length` and whether images are checked. Records are taken
in blocks of `BLOCK_RECORDS` in the order the reader gives them; rank r of w prepares
blocks r, r + w, ... and writes each to `block-NNNNN/` only when it is whole, so a killed
preparation keeps the blocks it finished and a rerun does the rest. A block holds its kept
conversations' token ids (one image token per image, expanded to `image_seq_length` when
read), which of them are answer tokens, their lengths, their ids and image references,
and `report.json` (kept, skipped by reason, leading assistant turns dropped). Once every
block is there, `complete.json` lists them: a later run opens the set without reading the
data again.

The folder must be on a file system every rank sees (as the output folder is).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mmpeft.data.conversation import BadRecord, Sample, image_bytes
from mmpeft.data.shards import ShardMember

BLOCK_RECORDS = 4096
ENCODE_BATCH = 256  # encodings held as Python lists at once (about 80 KB each at 2K tokens)
FORMAT_VERSION = 1
SHOWN_IDS = 5


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> list:
    """What a data file is, cheaply: its resolved path, size and modification time (a file
    edited in place changes the last two)."""
    out = []
    for path in sorted(str(p) for p in paths):
        stat = Path(path).stat()
        out.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def encoder_fingerprint(encoder) -> dict:
    """What an encoder's token ids depend on: its tokenizer (vocabulary, merges, special and
    added tokens), format, image token, run length and `max_length`."""
    tok = encoder.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return {"tokenizer": hashlib.sha256(vocab.encode()).hexdigest(), "class": type(tok).__name__,
            "specials": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
            "template": repr(encoder.template), "image_token_id": encoder.image_token_id,
            "image_seq_length": encoder.image_seq_length, "max_length": encoder.max_length,
            "lead_ids": list(encoder.lead_ids)}


def prepared_folder(root: str | os.PathLike, data: object, encoder, check_images: bool) -> Path:
    """The folder of the set prepared from `data` (a JSON-able description of the data:
    `files_fingerprint`s, a dataset's fingerprint, the image folder) with `encoder`."""
    key = json.dumps({"version": FORMAT_VERSION, "data": data, "encoder": encoder_fingerprint(encoder),
                      "check_images": check_images}, sort_keys=True, default=str)
    return Path(root) / hashlib.sha256(key.encode()).hexdigest()[:16]


class _Strings:
    """Strings stored as one UTF-8 file and their offsets, read one at a time."""

    @staticmethod
    def write(folder: Path, name: str, strings: list[str]) -> None:
        data = [s.encode() for s in strings]
        (folder / f"{name}.txt").write_bytes(b"".join(data))
        np.save(folder / f"{name}.idx.npy", np.cumsum([0] + [len(d) for d in data], dtype=np.int64))

    def __init__(self, folder: Path, name: str):
        self.text = np.memmap(folder / f"{name}.txt", dtype=np.uint8, mode="r") \
            if (folder / f"{name}.txt").stat().st_size else np.zeros(0, np.uint8)
        self.offsets = np.load(folder / f"{name}.idx.npy", mmap_mode="r")

    def __getitem__(self, k: int) -> str:
        return bytes(self.text[self.offsets[k]:self.offsets[k + 1]]).decode()


def _image_ref(image) -> list:
    if isinstance(image, ShardMember):
        return ["shard", image.shard, image.offset, image.size, image.name]
    if isinstance(image, bytes):
        raise TypeError("bytes")  # stored in the block's image file, see _write_block
    return ["path", str(image)]


def _image_from_ref(ref: list, blob: np.ndarray | None):
    if ref[0] == "shard":
        return ShardMember(*ref[1:])
    if ref[0] == "bytes":
        return bytes(blob[ref[1]:ref[1] + ref[2]])
    return Path(ref[1])


def check_image(image, seen: dict) -> tuple[str | None, str | None]:
    """(the SHA-1 of the image's bytes, None) when it decodes, else (None, why not); each
    distinct path or shard member is read once."""
    key = image if isinstance(image, ShardMember | Path | str) else None
    if key is not None and key in seen:
        return seen[key]
    try:
        data = image_bytes(image)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        result = hashlib.sha1(data).hexdigest(), None
    except (OSError, ValueError) as err:
        result = None, f"cannot read image {f'({len(image)} bytes)' if isinstance(image, bytes) else image}: {err}"
    if key is not None:
        seen[key] = result
    return result


def compact(encoded: dict, image_token_id: int, run: int) -> tuple[np.ndarray, np.ndarray, int]:
    """An encoding stored small: its token ids with one token for each image's run (int32),
    which of them are answer tokens, and its full length."""
    full = np.asarray(encoded["input_ids"], dtype=np.int64)
    is_image = full == image_token_id
    keep = ~is_image | (np.cumsum(is_image) % run == 1) | (run == 1)
    return full[keep].astype(np.int32), (np.asarray(encoded["labels"]) != -100)[keep], len(full)


def expand(ids: np.ndarray, answer: np.ndarray, image_token_id: int, run: int) -> dict:
    """`compact`'s inverse: `input_ids` with each image token repeated `run` times, and
    `labels` (the ids of answer tokens, -100 elsewhere), as lists."""
    repeats = np.where(ids == image_token_id, run, 1)
    ids, answer = np.repeat(ids.astype(np.int64), repeats), np.repeat(answer, repeats)
    return {"input_ids": ids.tolist(), "labels": np.where(answer, ids, -100).tolist()}


def prepare_block(samples: list[Sample], encoder, check_images: bool) -> dict:
    """Encode and check one block's samples, `ENCODE_BATCH` at a time: the kept ones as
    `(sample, compact encoding, image SHA-1s)`, what was skipped (`BadRecord`s in record
    order), and how many leading assistant turns were dropped."""
    dropped, kept, bad, seen = 0, [], [], {}
    for at in range(0, len(samples), ENCODE_BATCH):
        batch = []
        for sample in samples[at:at + ENCODE_BATCH]:
            if len(sample.messages) > 1 and sample.messages[0]["role"] == "assistant":
                sample, dropped = replace(sample, messages=sample.messages[1:]), dropped + 1
            batch.append(sample)
        encoded = iter(encoder.encode_texts([s for s in batch if not s.problem]))
        for sample in batch:
            result = BadRecord(sample.id, *sample.problem) if sample.problem else next(encoded)
            digests = []
            if not isinstance(result, BadRecord) and check_images:
                checked = [check_image(im, seen) for im in sample.images]
                problem = next((why for _, why in checked if why), None)
                if problem:
                    result = BadRecord(sample.id, problem, "bad image")
                digests = [digest for digest, _ in checked]
            if isinstance(result, BadRecord):
                bad.append(result)
            else:
                kept.append((sample, compact(result, encoder.image_token_id, encoder.image_seq_length), digests))
    return {"kept": kept, "bad": bad, "dropped_turns": dropped}


def _write_block(folder: Path, block: dict) -> None:
    """Write a prepared block to `folder` through a temporary name, so it is whole or absent."""
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    refs, blob = [], bytearray()
    for sample, _, _ in block["kept"]:
        record_refs = []
        for image in sample.images:
            if isinstance(image, bytes):
                record_refs.append(["bytes", len(blob), len(image)])
                blob += image
            else:
                record_refs.append(_image_ref(image))
        refs.append(json.dumps(record_refs))
    encodings = [enc for _, enc, _ in block["kept"]]
    np.save(tmp / "ids.npy", np.concatenate([ids for ids, _, _ in encodings] or [np.zeros(0, np.int32)]))
    np.save(tmp / "answer.npy", np.concatenate([answer for _, answer, _ in encodings] or [np.zeros(0, bool)]))
    np.save(tmp / "starts.npy", np.cumsum([0] + [len(ids) for ids, _, _ in encodings], dtype=np.int64))
    np.save(tmp / "lengths.npy", np.asarray([n for _, _, n in encodings], dtype=np.int32))
    np.save(tmp / "image_counts.npy", np.asarray([len(s.images) for s, _, _ in block["kept"]], dtype=np.int32))
    (tmp / "images.bin").write_bytes(bytes(blob))
    _Strings.write(tmp, "record_ids", [s.id for s, _, _ in block["kept"]])
    _Strings.write(tmp, "images", refs)
    _Strings.write(tmp, "digests", [",".join(d) for _, _, d in block["kept"]])  # empty unless images were checked
    report = {"kept": len(block["kept"]), "dropped_turns": block["dropped_turns"],
              "skipped": dict(Counter(b.kind for b in block["bad"])),
              "skipped_ids": [b.record_id for b in block["bad"][:SHOWN_IDS]],
              "first_bad": [block["bad"][0].record_id, block["bad"][0].reason, block["bad"][0].kind]
              if block["bad"] else None}
    (tmp / "report.json").write_text(json.dumps(report))
    try:
        os.replace(tmp, folder)
    except OSError:  # another run of the same data wrote the block first; it holds the same bytes
        shutil.rmtree(tmp)
        if not (folder / "report.json").exists():
            raise


def _blocks(samples: Iterable[Sample]) -> Iterator[tuple[int, list[Sample]]]:
    block, n = [], 0
    for sample in samples:
        block.append(sample)
        if len(block) == BLOCK_RECORDS:
            yield n, block
            block, n = [], n + 1
    if block or n == 0:
        yield n, block


def prepare_conversations(folder: Path, samples: Callable[[], Iterable[Sample]], encoder, skip_bad_records: bool,
                          check_images: bool = True, rank: int | None = None, world: int | None = None,
                          source: str | None = None, log=print) -> Path:
    """Prepare the conversations `samples()` yields into `folder` (see the module's
    docstring) unless a complete set is there. Every rank calls it: each takes its share of
    the blocks, then all meet in one gather of the process group (its timeout, 30 minutes
    under DeepSpeed, bounds how far one rank's share may outlast another's; at a few
    thousand records a second a rank, shares are minutes). Without `skip_bad_records`, the
    first bad record (in record order, over every rank) is raised as a `BadRecord` naming
    `source`, on every rank, and nothing is marked complete; with it, bad records are left
    out and counted by reason. `rank` and `world` default to the process group's (0 of 1
    without one)."""
    import torch.distributed as dist

    if rank is None or world is None:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if (folder / "complete.json").exists():
        log(f"data: prepared before, read from {folder}")
        return folder
    started, mine, first_bad, total = time.perf_counter(), 0, None, 0
    for n, block in _blocks(samples()):
        total = n + 1
        if first_bad is not None:
            break  # the run stops; the other ranks learn why at the exchange below
        if n % world != rank:
            continue
        out = folder / f"block-{n:05d}"
        if not (out / "report.json").exists():
            prepared = prepare_block(block, encoder, check_images)
            if prepared["bad"] and not skip_bad_records:
                first_bad = (n, prepared["bad"][0])
                continue
            _write_block(out, prepared)
        mine += len(block)
        if rank == 0 and n % (world * 8) == 0:
            rate = mine / max(time.perf_counter() - started, 1e-9)
            log(f"data: preparing, block {n + 1} read, {rate:,.0f} records/s on this rank")
    failures = _gather((first_bad[0], str(first_bad[1].record_id), first_bad[1].reason, first_bad[1].kind)
                       if first_bad else None)
    bad = min((f for f in failures if f), default=None)
    if bad:
        raise BadRecord(bad[1], bad[2], bad[3], source)
    if rank == 0:
        missing = [n for n in range(total) if not (folder / f"block-{n:05d}" / "report.json").exists()]
        if missing:
            raise RuntimeError(f"{folder}: blocks {missing[:5]} were not written; is the folder shared by every rank?")
        tmp = folder / f".complete.json.partial-{os.getpid()}"
        tmp.write_text(json.dumps({"blocks": total, "source": source}))
        os.replace(tmp, folder / "complete.json")
        log(f"data: prepared {total} block(s) into {folder} in {time.perf_counter() - started:.0f} s")
    _gather(None)  # every rank waits for complete.json
    return folder


def _gather(value) -> list:
    """`value` from every rank (only this one's without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


class PreparedConversations(Dataset):
    """A prepared set (`prepare_conversations`) read lazily: what `ConversationDataset`
    gives (`input_ids`, `labels`, `pixel_values` or `image_features`, `id`; `lengths`,
    `has_image`, `skipped`, `skip_report()`), with only the lengths in memory."""

    def __init__(self, folder: str | os.PathLike, encoder, features=None):
        self.folder, self.encoder, self.features = Path(folder), encoder, features
        complete = json.loads((self.folder / "complete.json").read_text())
        names = [f"block-{n:05d}" for n in range(complete["blocks"])]
        self.skipped, self.skipped_ids, self.dropped_turns, self.first_bad = Counter(), [], 0, None
        lengths, image_counts, first = [], [], [0]
        for name in names:
            report = json.loads((self.folder / name / "report.json").read_text())
            self.skipped.update(report["skipped"])
            self.skipped_ids += report["skipped_ids"][: SHOWN_IDS - len(self.skipped_ids)]
            self.dropped_turns += report["dropped_turns"]
            self.first_bad = self.first_bad or report["first_bad"]
            lengths.append(np.load(self.folder / name / "lengths.npy"))
            image_counts.append(np.load(self.folder / name / "image_counts.npy"))
            first.append(first[-1] + report["kept"])
        self._names, self._first = names, np.asarray(first)
        self._lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        if not len(self._lengths):
            raise ValueError(f"no usable records (skipped: {dict(self.skipped)})")
        self._has_image = np.concatenate(image_counts) > 0 if image_counts else np.zeros(0, bool)
        self._open: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self._lengths)

    def _block(self, b: int) -> dict:
        if b not in self._open:
            folder = self.folder / self._names[b]
            blob = folder / "images.bin"
            self._open[b] = {"ids": np.load(folder / "ids.npy", mmap_mode="r"),
                             "answer": np.load(folder / "answer.npy", mmap_mode="r"),
                             "starts": np.load(folder / "starts.npy", mmap_mode="r"),
                             "record_ids": _Strings(folder, "record_ids"), "images": _Strings(folder, "images"),
                             "digests": _Strings(folder, "digests"),
                             "blob": np.memmap(blob, dtype=np.uint8, mode="r") if blob.stat().st_size else None}
        return self._open[b]

    def sample(self, i: int) -> tuple[Sample, np.ndarray, np.ndarray, list[str]]:
        """The `i`-th kept conversation's id and images (as a `Sample` without messages), its
        token ids and answer flags with one token per image, and its images' SHA-1s (none
        when images were not checked)."""
        b = int(np.searchsorted(self._first, i, side="right")) - 1
        block, j = self._block(b), i - int(self._first[b])
        lo, hi = int(block["starts"][j]), int(block["starts"][j + 1])
        images = [_image_from_ref(ref, block["blob"]) for ref in json.loads(block["images"][j])]
        digests = block["digests"][j]
        return Sample(block["record_ids"][j], [], images), np.asarray(block["ids"][lo:hi]), \
            np.asarray(block["answer"][lo:hi]), digests.split(",") if digests else []

    def __getitem__(self, i: int) -> dict:
        sample, ids, answer, digests = self.sample(i)
        row = {**expand(ids, answer, self.encoder.image_token_id, self.encoder.image_seq_length), "id": sample.id}
        if self.features is not None:
            from mmpeft.data.feature_cache import image_digest

            digests = digests or [image_digest(im) for im in sample.images]
            feats = [self.features.get(d) for d in digests]
            return {**row, "image_features": torch.stack(feats) if feats else None}
        return {**row, "pixel_values": self.encoder.images(sample)}

    def images(self) -> Iterator[tuple[str | None, object]]:
        """(SHA-1 or None, image) of every kept conversation's images, in order (for building
        a feature cache without hashing the images again)."""
        for i in range(len(self)):
            sample, _, _, digests = self.sample(i)
            yield from zip(digests or [None] * len(sample.images), sample.images, strict=True)

    @property
    def lengths(self) -> list[int]:
        return self._lengths.tolist()

    @property
    def has_image(self) -> list[bool]:
        return self._has_image.tolist()

    def skip_report(self) -> str:
        """One line saying what was skipped and why, and how many leading assistant turns were
        dropped (empty when neither happened)."""
        from mmpeft.data.dataset import skip_line

        return skip_line(self.skipped, self.skipped_ids, self.dropped_turns)

    def __getstate__(self):  # memory maps do not travel to DataLoader workers; each opens its own
        return {**self.__dict__, "_open": {}}
