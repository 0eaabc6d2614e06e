"""Pictures: boxes drawn on images (predicted and ground truth) and an HTML page of them.

Used by `predict` (one image -> PNG) and `evaluate` (a page of images with predicted and true boxes).
Boxes are in pixels of the image they are drawn on, (x1, y1, x2, y2).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw

PRED_COLOUR = (230, 40, 40)
GT_COLOUR = (30, 200, 60)


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str] | None = None,
               colour=PRED_COLOUR, width: int = 2) -> Image.Image:
    """A copy of `image` with boxes (pixels of this image) and their labels drawn."""
    img = image.convert("RGB")
    draw = ImageDraw.Draw(img)
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        if labels is not None and i < len(labels) and labels[i]:
            text = str(labels[i])
            ty = y1 - 11 if y1 >= 11 else y1 + 1
            draw.rectangle([x1, ty, x1 + draw.textlength(text) + 2, ty + 10], fill=colour)
            draw.text((x1 + 1, ty - 1), text, fill=(255, 255, 255))
    return img


def draw_prediction(image: Image.Image, pred: Sequence[dict], gt: Sequence[dict] = (),
                    min_side: int = 384) -> Image.Image:
    """Ground truth (green) under predictions (red). Objects are {"desc", "bbox"[, "score"]} in pixels of
    `image`; small images are upscaled (nearest) to `min_side` first so labels stay legible."""
    scale = max(1.0, min_side / max(image.width, image.height))
    img = image.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)

    def scaled(objs):
        return [[float(v) * scale for v in o["bbox"]] for o in objs]

    img = draw_boxes(img, scaled(gt), [o["desc"] for o in gt], GT_COLOUR)
    labels = [f'{o["desc"]} {o["score"]:.2f}' if "score" in o else o["desc"] for o in pred]
    return draw_boxes(img, scaled(pred), labels, PRED_COLOUR)


def write_html(out_dir: str, entries: Sequence[dict], title: str = "coordexp_jax evaluation",
               summary: dict | None = None) -> str:
    """Writes `index.html` in `out_dir` showing each entry {"image": relative PNG path, "caption": text}."""
    rows = []
    if summary:
        cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                        for k, v in summary.items())
        rows.append(f"<table class='summary'>{cells}</table>")
    rows.append("<div class='grid'>")
    for e in entries:
        rows.append(f"<figure><img src='{html.escape(e['image'])}'><figcaption>{html.escape(e.get('caption', ''))}"
                    "</figcaption></figure>")
    rows.append("</div>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif} .grid{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0;width:390px}"
            "figure img{max-width:384px} figcaption{font-size:12px;white-space:pre-wrap} "
            ".summary td{padding:2px 8px} .legend span{padding:0 6px;color:#fff}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class='legend'><span style='background:rgb{GT_COLOUR}'>ground truth</span>"
            f" <span style='background:rgb{PRED_COLOUR}'>prediction (desc score)</span></p>" + "\n".join(rows)
            + "</body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
