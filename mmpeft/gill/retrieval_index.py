"""A retrieval index: the CLIP embeddings of a set of images, saved beside the list of the
images. It holds CLIP's own embeddings, not a trained head's, so one index serves every
GILL run on the same CLIP; the run's retrieval head projects them at query time.

    python -m mmpeft.gill.retrieval_index IMAGE_FOLDER OUT_DIR --clip PATH_OR_HUB_ID
    python -m mmpeft.gill.retrieval_index DATASET OUT_DIR --clip PATH_OR_HUB_ID --dataset --split test

A dataset (a Hugging Face Hub id, or a folder written by `save_to_disk` or readable by
`load_dataset`) has its images written under `OUT_DIR/images/` first, so the index always
lists image files that a page can show.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class RetrievalIndex:
    """`embeddings` `(n, clip_dim)` of the images `items` (paths as given)."""

    def __init__(self, embeddings: torch.Tensor, items: list[str], clip_source: str):
        if len(embeddings) != len(items):
            raise ValueError(f"{len(embeddings)} embeddings for {len(items)} images")
        self.embeddings, self.items, self.clip_source = embeddings, list(items), clip_source

    @classmethod
    def build(cls, images: list, clip_embeddings, clip_source: str, batch_size: int = 64) -> RetrievalIndex:
        """Embed `images` (paths) with a `ClipEmbeddings`."""
        rows = [clip_embeddings.encode(images[b:b + batch_size]) for b in range(0, len(images), batch_size)]
        return cls(torch.cat(rows), [str(im) for im in images], clip_source)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.contiguous()}, folder / "index.safetensors")
        (folder / "index.json").write_text(json.dumps({"clip": self.clip_source, "items": self.items}, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> RetrievalIndex:
        folder = Path(folder)
        if not (folder / "index.json").exists():
            raise FileNotFoundError(f"{folder} holds no retrieval index (index.json + index.safetensors)")
        meta = json.loads((folder / "index.json").read_text())
        return cls(load_file(folder / "index.safetensors")["embeddings"], meta["items"], meta["clip"])

    @torch.no_grad()
    def search(self, retrieval_head, text_states: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-`k` (scores, indices) for each query state at `[IMG0]`, by cosine similarity
        of the head's text and image embeddings."""
        text = retrieval_head.embed_text(text_states)
        image = retrieval_head.embed_image(self.embeddings.to(text.device, text.dtype))
        return (text @ image.T).topk(min(k, len(self.items)), dim=-1)


def images_in(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def images_from_dataset(source: str, split: str, column: str, out: str | Path) -> list[Path]:
    """Write the `column` images of a dataset's `split` as PNG files under `out` (named by
    row) and return their paths; a row without an image is an error naming it."""
    import datasets

    path = Path(source)
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        data = datasets.load_from_disk(str(path))
        data = data[split] if isinstance(data, datasets.DatasetDict) else data
    else:
        data = datasets.load_dataset(source, split=split)
    if column not in data.column_names:
        raise ValueError(f"{source} ({split}) has no column {column!r}; its columns: {', '.join(data.column_names)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for row, image in enumerate(data[column]):
        if image is None:
            raise ValueError(f"{source} ({split}) row {row}: column {column!r} holds no image")
        paths.append(out / f"{row:07d}.png")
        image.convert("RGB").save(paths[-1])
    return paths


def main(argv=None):
    from transformers import CLIPModel, CLIPProcessor

    from mmpeft.gill.data import ClipEmbeddings

    parser = argparse.ArgumentParser(description="Build a retrieval index of CLIP embeddings from an image folder "
                                                 "or a dataset")
    parser.add_argument("images", help="a folder of images (searched recursively), or a dataset with --dataset")
    parser.add_argument("out", help="folder to write index.safetensors and index.json to")
    parser.add_argument("--clip", required=True, help="the CLIP the GILL run used (Hub id or local folder)")
    parser.add_argument("--dataset", action="store_true", help="`images` is a dataset (Hub id or local folder)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column", default="image")
    args = parser.parse_args(argv)
    if args.dataset:
        images = images_from_dataset(args.images, args.split, args.image_column, Path(args.out) / "images")
    else:
        images = images_in(args.images)
    if not images:
        raise SystemExit(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {args.images}")
    clip = CLIPModel.from_pretrained(args.clip)
    embed = ClipEmbeddings(clip.vision_model, CLIPProcessor.from_pretrained(args.clip).image_processor)
    index = RetrievalIndex.build(images, embed, args.clip)
    print(f"index of {len(images)} images written to {index.save(args.out)}")


if __name__ == "__main__":
    main()
