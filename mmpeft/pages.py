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


def write_run_report(out: str | Path, tables: dict[str, list[tuple]], note: str = "") -> Path:
    """`report.html` in `out`: each figures table (rows of part, figure, value, reference)
    and, for every run folder in `out` or in its `seed*/` folders (one holding
    `metrics.json`, as `mmpeft pipeline --recipe-seeds` lays them out), its `training.png`,
    links to its sample page, `metrics.json` and `metrics.jsonl`, and the TensorBoard
    command when it logged there. Links are relative, so the folder can be moved or served."""
    out = Path(out)
    esc = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>mmpeft pipeline</title>",
             "<style>td,th{padding:2px 8px;text-align:left}td.v{text-align:right}</style>",
             "<h1>mmpeft pipeline</h1>", f"<p>{esc(note)}</p>" if note else ""]
    for title, rows in tables.items():
        parts.append(f"<h2>{esc(title)}</h2><table><tr><th>part</th><th>figure</th><th>value</th><th>reference</th></tr>")
        for part, figure, value, reference in rows:
            shown = f"{value:.3f}" if isinstance(value, float) else esc(str(value))
            parts.append(f"<tr><td>{esc(str(part))}</td><td>{esc(figure)}</td><td class=v>{shown}</td>"
                         f"<td>{esc(str(reference))}</td></tr>")
        parts.append("</table>")
    runs = sorted(p.parent for pattern in ("*/metrics.json", "seed*/*/metrics.json") for p in out.glob(pattern))
    if runs:
        parts.append("<h2>Runs</h2>")
    for run in runs:
        name = run.relative_to(out).as_posix()
        links = [f"<a href='{esc(name)}/{f}'>{f}</a>" for f in ("metrics.json", "metrics.jsonl", "samples/index.html")
                 if (run / f).is_file()]
        if (run / "runs").is_dir():
            links.append(f"TensorBoard: <code>tensorboard --logdir {esc(str(run / 'runs'))}</code>")
        parts.append(f"<h3>{esc(name)}</h3><p>{' &middot; '.join(links)}</p>")
        if (run / "training.png").is_file():
            parts.append(f"<img src='{esc(name)}/training.png' alt='{esc(name)} training curves' width='640'>")
    path = out / "report.html"
    path.write_text("\n".join(p for p in parts if p) + "\n")
    return path
