"""A page a person can look at: story context, the model's text and image, the truth."""

from __future__ import annotations

import html
from pathlib import Path

from PIL import Image


def _img(folder: Path, name: str, image, size: int = 128) -> str:
    if image is None:
        return "<em>no image</em>"
    if not isinstance(image, Image.Image):
        image = Image.open(image).convert("RGB")
    image.resize((size, size), Image.Resampling.NEAREST).save(folder / name)
    return f'<img src="{name}" width="{size}" height="{size}">'


def write_story_page(path: str | Path, rows: list[dict], title: str) -> Path:
    """Write an HTML page with one block per row: `context` (list of (text, image)),
    `prompt`, `text` (generated), `image` (generated), and optional `truth_text`,
    `truth_image`, `baseline_image`. Images are PNG files beside the page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<h1>{html.escape(title)}</h1>"]
    for n, row in enumerate(rows):
        parts.append(f"<h2>{html.escape(str(row.get('id', n)))}</h2><table><tr>")
        for k, (text, image) in enumerate(row.get("context", [])):
            parts.append(f"<td>{_img(path.parent, f'{path.stem}-{n}-ctx{k}.png', image)}<br>{html.escape(text)}</td>")
        parts.append(f"<td style='border:2px solid #36c'>{_img(path.parent, f'{path.stem}-{n}-gen.png', row['image'])}"
                     f"<br><b>{html.escape(row['text'] or '(no text)')}</b></td>")
        if "truth_image" in row:
            parts.append(f"<td>{_img(path.parent, f'{path.stem}-{n}-true.png', row['truth_image'])}<br>"
                         f"true: {html.escape(row.get('truth_text', ''))}</td>")
        if "baseline_image" in row:
            parts.append(f"<td>{_img(path.parent, f'{path.stem}-{n}-sd.png', row['baseline_image'])}<br>"
                         "SD given the true caption</td>")
        parts.append(f"</tr></table><p>prompt: {html.escape(row.get('prompt', ''))}</p>")
    path.write_text("\n".join(parts) + "\n")
    return path
