"""What a person looks at: the sample gallery, a self-contained HTML page (images inlined) that
opens anywhere, and the attention figure of an attention captioner."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class GalleryItem:
    image_path: Path
    generated: str
    references: list[str]
    verdict: tuple[bool, str] | None = None  # (right?, in words), where the dataset can judge a caption


def gallery_html(items: list[GalleryItem], title: str, summary: dict[str, float],
                 about: dict[str, str] | None = None) -> str:
    """The page; `about` (e.g. run, experiment, params changed) is listed under the title."""
    rows = []
    for item in items:
        data = base64.b64encode(Path(item.image_path).read_bytes()).decode()
        verdict = "" if item.verdict is None else \
            f'<span class="{"ok" if item.verdict[0] else "bad"}">{html.escape(item.verdict[1])}</span>'
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in item.references)
        rows.append(
            f'<div class="card"><img src="data:image/jpeg;base64,{data}" alt="">'
            f"<p><b>{html.escape(item.generated) or '(empty)'}</b> {verdict}</p><ul>{refs}</ul></div>"
        )
    scores = " · ".join(f"{k} {v:.3f}" for k, v in summary.items())
    facts = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in (about or {}).items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 1em; }}
.card {{ border: 1px solid #ccc; border-radius: 6px; padding: .6em; }}
.card img {{ width: 100%; }} .card ul {{ color: #555; font-size: .85em; padding-left: 1.2em; }}
.ok {{ color: #1a7f37; font-size: .8em; }} .bad {{ color: #cf222e; font-size: .8em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>{f"<ul>{facts}</ul>" if facts else ""}<p>{html.escape(scores)}</p>
<p>Bold: the generated caption. Below it: the reference captions.</p>
<div class="grid">
{chr(10).join(rows)}
</div></body></html>
"""


def attention_figure(image: Image.Image, words: list[str], maps: np.ndarray, side: int = 160,
                     per_row: int = 6) -> Image.Image:
    """One panel per word: `image` (the crop the network saw) lit where the decoder looked
    before saying that word, dimmed elsewhere, with the word and its largest attention weight.

    `maps` (len(words), h, w) are the word's attention weights over the grid's cells (summing
    to 1); each is scaled by its own largest weight and bilinearly upsampled over the image.
    """
    picture = np.asarray(image.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float32)
    label = 16
    rows = max(1, -(-len(words) // per_row))
    figure = Image.new("RGB", (max(1, min(len(words), per_row)) * side, rows * (side + label)), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default()
    for n, (word, weights) in enumerate(zip(words, maps)):
        weights = np.asarray(weights, dtype=np.float32)
        heat = Image.fromarray(weights / max(float(weights.max()), 1e-8), mode="F").resize((side, side), Image.BILINEAR)
        light = 0.25 + 0.75 * np.clip(np.asarray(heat), 0, 1)[..., None]  # dim the cells it did not attend to
        panel = Image.fromarray((picture * light).round().astype(np.uint8))
        x, y = (n % per_row) * side, (n // per_row) * (side + label)
        figure.paste(panel, (x, y))
        draw.text((x + 4, y + side + 2), f"{word} ({weights.max():.2f})", fill="black", font=font)
    return figure
