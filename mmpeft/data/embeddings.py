"""Precomputed vectors with their texts, General-GPT's data: a folder holding

    vectors.safetensors   one tensor `vectors`, (rows, dim): any encoder's output
    texts.jsonl           one line per text: {"text": "...", "row": k}, k a row of the vectors

Several texts may share a row (an image's captions). `clip_image_set` writes one from
caption pairs with a CLIP model's normalised image embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from mmpeft.data.conversation import BadRecord, open_image
from mmpeft.data.dataset import pad_tokens
from mmpeft.data.feature_cache import image_digest

VECTORS, TEXTS = "vectors.safetensors", "texts.jsonl"


def save_embedding_set(folder: str | Path, vectors: torch.Tensor, texts: list[tuple[str, int]]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"vectors": vectors.detach().cpu().contiguous()}, folder / VECTORS)
    (folder / TEXTS).write_text("".join(json.dumps({"text": t, "row": r}) + "\n" for t, r in texts))
    return folder


def read_embedding_set(folder: str | Path) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """`(vectors, [(text, row), ...])`; a bad line is an error naming file and line."""
    folder = Path(folder)
    for name in (VECTORS, TEXTS):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder}: no {name} (an embedding set holds {VECTORS} and {TEXTS})")
    vectors = load_file(folder / VECTORS).get("vectors")
    if vectors is None or vectors.dim() != 2:
        raise ValueError(f"{folder / VECTORS}: needs one 2-D tensor named 'vectors'")
    texts = []
    for n, line in enumerate((folder / TEXTS).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, k = row["text"], row["row"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{folder / TEXTS} line {n}: needs {{\"text\": ..., \"row\": ...}} ({err})") from err
        if not isinstance(k, int) or not 0 <= k < vectors.shape[0]:
            raise ValueError(f"{folder / TEXTS} line {n}: row {k!r} is not a row of the {vectors.shape[0]} vectors")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{folder / TEXTS} line {n}: empty text")
        texts.append((text, k))
    return vectors, texts


@torch.no_grad()
def clip_image_set(folder: str | Path, pairs: list, clip_model, processor, batch_size: int = 64) -> Path:
    """An embedding set of caption pairs (`Sample`s of one image and its caption): each
    distinct image's L2-normalised CLIP image embedding, with its captions. A pair a reader
    found bad (`Sample.problem`) is an error naming it."""
    rows: dict[str, int] = {}
    images, texts = [], []
    for p in pairs:
        if p.problem:
            raise BadRecord(p.id, *p.problem)
        image = p.images[0]  # a file by its path, bytes or a shard member by content
        key = str(image) if isinstance(image, str | Path) else image_digest(image)
        if key not in rows:
            rows[key] = len(images)
            images.append(image)
        texts.append((p.messages[-1]["content"], rows[key]))
    chunks = []
    for start in range(0, len(images), batch_size):
        pil = [open_image(im, f"image {start + k}") for k, im in enumerate(images[start:start + batch_size])]
        feats = clip_model.get_image_features(pixel_values=processor(images=pil, return_tensors="pt")["pixel_values"])
        chunks.append(torch.nn.functional.normalize(getattr(feats, "pooler_output", feats), dim=-1))
    return save_embedding_set(folder, torch.cat(chunks), texts)


class EmbeddingTextDataset(Dataset):
    """One sample per (text, task): `input_ids`, `labels`, and the vector going in (caption,
    sentence) or coming out (retrieval)."""

    def __init__(self, vectors: torch.Tensor, texts: list[tuple[str, int]], tasks: list[str], encode):
        self.vectors = vectors
        self.items = [(task, row, encode(task, text)) for text, row in texts for task in tasks]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        task, row, encoded = self.items[i]
        key = "vector_out" if task == "retrieval" else "vector_in"
        return {**encoded, key: self.vectors[row]}

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for _, _, e in self.items]


def collate_embedding_texts(pad_id: int):
    """Right padding; labels padded with -100; the vectors in and out stacked in row order."""

    def collate(rows: list[dict]) -> dict:
        batch = pad_tokens(rows, pad_id)
        for key, name in (("vector_in", "vectors_in"), ("vector_out", "vectors_out")):
            found = [r[key] for r in rows if key in r]
            if found:
                batch[name] = torch.stack(found)
        return batch

    return collate
