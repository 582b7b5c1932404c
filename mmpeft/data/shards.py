"""Webdataset tar shards read in place: each tar's headers are walked once, small text
members are read, and every image becomes a `ShardMember`, a reference read only when a
batch needs it, so a shard's images never sit in memory together.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass(frozen=True, slots=True)
class ShardMember:
    """An image inside an uncompressed tar shard, read only when needed: the shard's path,
    where the member's data starts in it, its size and its name in the tar. Small and
    picklable, so millions of them fit in memory and travel to DataLoader workers."""

    shard: str
    offset: int
    size: int
    name: str

    def __str__(self) -> str:
        return f"{self.shard}/{self.name}"

    def read_bytes(self) -> bytes:
        """The member's bytes; a shard that ends before them is an `OSError` naming the member."""
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self}: the shard ends {len(data)} of {self.size} bytes into the member")
        return data


def index_shard(shard: str) -> dict[str, dict]:
    """Key -> {extension: caption bytes (`txt`) or `ShardMember` (images)} of one tar, keys
    in the tar's order. Raises `tarfile.ReadError` for a compressed or cut-short tar: one
    whose member runs past the end of the file or that has no end-of-archive block after
    its last member (tarfile itself stops quietly at a header cut in half)."""
    with open(shard, "rb") as f:
        head = f.read(6)
        kind = next((name for magic, name in COMPRESSED.items() if head.startswith(magic)), None)
        if kind:
            raise tarfile.ReadError(f"{kind}-compressed; images are read in place, so shards must be plain .tar")
        length = Path(shard).stat().st_size
        members: dict[str, dict] = {}
        end = count = 0
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                count += 1
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not info.isfile():
                    continue
                if info.offset_data + info.size > length:
                    raise tarfile.ReadError(f"member {info.name} runs past the end of the file ({length} bytes): "
                                            "the file is cut short")
                folder, sep, base = info.name.rpartition("/")
                stem, _, ext = base.partition(".")  # webdataset: the key ends at the name's first dot
                parts = members.setdefault(folder + sep + stem, {})
                if ext.lower() == "txt":
                    parts["txt"] = tar.extractfile(info).read()
                elif ext.lower() in IMAGE_EXTENSIONS:
                    parts[ext.lower()] = ShardMember(str(shard), info.offset_data, info.size, info.name)
        f.seek(end)
        if f.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise tarfile.ReadError(f"no end-of-archive block at byte {end} after {count} member(s): the file is "
                                    "cut short or damaged")
    return members
