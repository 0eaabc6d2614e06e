"""Pictures: predicted and ground-truth boxes drawn on an image, with a legend; and a simple HTML page of them.

One drawing function, `draw_prediction`, serves `predict` (one PNG per image), `evaluate` (the report's pictures)
and any TensorBoard image (`np.asarray(draw_prediction(...))` is an [H, W, 3] uint8 array).

How a picture reads (`LEGEND` holds the same in data form for HTML pages, `legend_html` renders it):

- ground truth: DASHED outline drawn just OUTSIDE its box, label under the box;
  light green when a prediction matched it, light orange with a "MISS" tag when none did;
- prediction: SOLID outline drawn just INSIDE its box, label above the box ("desc score");
  light blue when it matched a ground-truth box, pink with an "FP" tag when it matched none
  (without ground truth every prediction is light blue);
- every line and label has a black halo, so it reads on any background (the colours are light tints, far from the
  saturated colours of the synthetic shapes and of most photographs' objects);
- a perfect hit shows the dashed green frame hugging the solid blue one: neither hides the other, and the two labels
  sit on opposite sides of the box.

Matching is `metrics.match_image` (greedy 1:1 by decreasing IoU, IoU >= 0.5, same desc): the rule of the F1 metric.
Small images are upscaled (nearest neighbour) to `min_side` pixels first; line width and font size grow with the
picture (`style_for`). Boxes are in pixels of the image given, (x1, y1, x2, y2).
"""

from __future__ import annotations

import dataclasses
import html
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GT_COLOUR = (140, 255, 140)  # ground truth found by a prediction (light green, dashed)
MISS_COLOUR = (255, 200, 140)  # ground truth no prediction matched (light orange, dashed, "MISS")
PRED_COLOUR = (150, 200, 255)  # prediction that matched a ground-truth box, or any prediction without gt
FP_COLOUR = (255, 150, 230)  # prediction that matched no ground-truth box (pink, "FP")
HALO_COLOUR = (0, 0, 0)
TEXT_COLOUR = (0, 0, 0)
LEGEND_BG = (255, 255, 255)

SCORE_EXPLANATION = ("score = exp(mean log-prob of the box's 4 coordinate tokens), 0-1. The probability spreads "
                     "over neighbouring coordinate bins, so a correct box often scores only 0.1-0.3: what counts is "
                     "the ranking (AP with the logprob rule).")

LEGEND = (  # (key, colour, style, label): what `draw_legend` draws and HTML pages can show
    {"key": "gt", "colour": GT_COLOUR, "style": "dashed", "label": "ground truth (found)", "needs_gt": True},
    {"key": "miss", "colour": MISS_COLOUR, "style": "dashed", "label": "MISS: ground truth not found",
     "needs_gt": True},
    {"key": "pred", "colour": PRED_COLOUR, "style": "solid", "label": "prediction: desc score", "needs_gt": False},
    {"key": "fp", "colour": FP_COLOUR, "style": "solid", "label": "FP: prediction matching no ground truth",
     "needs_gt": True},
)


@dataclasses.dataclass(frozen=True)
class Style:
    """Sizes of one picture, in pixels of the (upscaled) picture."""

    line: int  # outline width
    halo: int  # black border on each side of a line or label
    font_size: int  # label text height (TrueType, `ImageFont.load_default(size=...)`)
    dash: int  # dash length of ground-truth outlines (gaps are 2/3 of it)


def style_for(width: int, height: int) -> Style:
    """Line width and font size scaled with the picture's longer side L: line = max(2, L/200), font = max(12, L/32)
    (16 px at 512 px, 32 px at 1024 px, 62 px at 2000 px)."""
    long_side = max(int(width), int(height))
    line = max(2, round(long_side / 200))
    return Style(line=line, halo=max(1, line // 2), font_size=max(12, round(long_side / 32)), dash=3 * line)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled TrueType font (FreeType), any size


def _hex(c) -> str:
    return "#%02x%02x%02x" % tuple(c)


def _get(o, key, default=None):
    return o.get(key, default) if isinstance(o, dict) else getattr(o, key, default)


def _box(o, scale: float) -> tuple[int, int, int, int] | None:
    """The box in picture pixels (sorted corners, rounded), or None when a coordinate is not finite."""
    x1, y1, x2, y2 = (float(v) * scale for v in _get(o, "bbox"))
    if not all(np.isfinite((x1, y1, x2, y2))):
        return None
    x1, x2 = sorted((x1, x2))  # an inverted box is drawn where it covers
    y1, y2 = sorted((y1, y2))
    return round(x1), round(y1), round(x2), round(y2)


def _rect(draw, box, colour, width, grow=0):
    """Outline of `box` grown by `grow` px on each side, `width` px wide, drawn inward from the grown edge."""
    x1, y1, x2, y2 = box
    draw.rectangle([x1 - grow, y1 - grow, x2 + grow, y2 + grow], outline=colour, width=width)


def _dashed(draw, box, colour, width, dash, grow=0):
    """Dashed outline: dashes of `dash` px with gaps of 2/3 of it, along each edge of `box` grown by `grow`."""
    x1, y1, x2, y2 = box[0] - grow, box[1] - grow, box[2] + grow, box[3] + grow
    step = dash + max(1, 2 * dash // 3)
    for a, b, fixed, horizontal in ((x1, x2, y1, True), (x1, x2, y2 - width + 1, True),
                                    (y1, y2, x1, False), (y1, y2, x2 - width + 1, False)):
        for s in range(a, b + 1, step):
            e = min(s + dash - 1, b)
            if horizontal:
                draw.rectangle([s, fixed, e, fixed + width - 1], fill=colour)
            else:
                draw.rectangle([fixed, s, fixed + width - 1, e], fill=colour)


def _label(draw, text, anchor_x, top, colour, st: Style, font, img_w, img_h, below: bool):
    """A filled label box with black text and a black border. `below`: placed with its top at `top`; else with its
    bottom at `top`. Moved inside the picture when it would leave it."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    pad = max(2, st.font_size // 6)
    w, h = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
    lx = min(max(anchor_x, 0), max(img_w - w, 0))
    ly = top if below else top - h
    ly = min(max(ly, 0), max(img_h - h, 0))
    draw.rectangle([lx, ly, lx + w - 1, ly + h - 1], fill=colour, outline=HALO_COLOUR, width=max(1, st.halo))
    draw.text((lx + pad - x0, ly + pad - y0), text, fill=TEXT_COLOUR, font=font)
    return lx, ly, lx + w - 1, ly + h - 1


def draw_prediction(image: Image.Image, pred: Sequence = (), gt: Sequence = (), match=None, *,
                    min_side: int = 512, legend: bool = True, iou_threshold: float = 0.5) -> Image.Image:
    """The picture of one image's predictions (and ground truth): see the module docstring for how it reads.

    pred / gt: objects {"desc", "bbox"[, "score"]} (or with those attributes, e.g. `metrics.PredObject`), boxes in
    pixels of `image`, (x1, y1, x2, y2). `match`: a `metrics.ImageMatch` of (pred, gt); computed with
    `metrics.match_image(pred, gt, iou_threshold)` when gt is given and match is None. Without gt nothing is
    marked as a hit, a miss or a false positive. The image is upscaled (nearest) so its longer side is at least
    `min_side`; `legend`: a legend strip (colours, the score's meaning, TP/FP/miss counts) is added below.
    A box with a non-finite coordinate is not drawn (it still counts in the legend's figures). Returns a new RGB
    image.
    """
    from coordexp_jax import metrics as M

    scale = max(1.0, min_side / max(image.width, image.height))
    img = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    W, H = img.size
    st = style_for(W, H)
    font = _font(st.font_size)
    has_gt = len(gt) > 0
    if has_gt and match is None:
        match = M.match_image(pred, gt, iou_threshold)
    gt_hit = match.gt_matched if has_gt else np.zeros(0, bool)
    pred_hit = match.pred_to_gt >= 0 if has_gt else np.ones(len(pred), bool)
    draw = ImageDraw.Draw(img)
    w, h = st.line, st.halo
    gt_boxes = [_box(o, scale) for o in gt]
    pred_boxes = [_box(o, scale) for o in pred]
    # ground truth: coloured band just outside the box (grown by h + w), black halo around it and in the gaps
    for box, hit in zip(gt_boxes, gt_hit):
        if box is None:
            continue
        _rect(draw, box, HALO_COLOUR, w + 2 * h, grow=2 * h + w)
        _dashed(draw, box, GT_COLOUR if hit else MISS_COLOUR, w, st.dash, grow=h + w)
    # predictions: coloured band just inside the box, black halo on both sides
    for box, hit in zip(pred_boxes, pred_hit):
        if box is None:
            continue
        _rect(draw, box, HALO_COLOUR, w + 2 * h, grow=h)
        _rect(draw, box, PRED_COLOUR if hit else FP_COLOUR, w)
    # labels last, so no line crosses them: gt under its box, predictions above theirs
    for o, box, hit in zip(gt, gt_boxes, gt_hit):
        if box is None:
            continue
        text = str(_get(o, "desc", "")) if hit else f"MISS {_get(o, 'desc', '')}"
        _label(draw, text, box[0] - 2 * h - w, box[3] + 2 * h + w + 1, GT_COLOUR if hit else MISS_COLOUR, st, font,
               W, H, below=True)
    for o, box, hit in zip(pred, pred_boxes, pred_hit):
        if box is None:
            continue
        score = _get(o, "score")
        text = str(_get(o, "desc", "")) + (f" {float(score):.2f}" if score is not None else "")
        _label(draw, text if hit else f"FP {text}", box[0] - h, box[1] - h - 1, PRED_COLOUR if hit else FP_COLOUR,
               st, font, W, H, below=False)
    if not legend:
        return img
    counts = None
    if has_gt:
        counts = f"TP {match.tp}   FP {match.fp}   MISS {match.fn}" + (
            f"   mean IoU {match.mean_iou:.2f}" if match.tp else "")
    strip = draw_legend(W, has_gt=has_gt, scored=any(_get(o, "score") is not None for o in pred), counts=counts,
                        style=st)
    out = Image.new("RGB", (W, H + strip.height), LEGEND_BG)
    out.paste(img, (0, 0))
    out.paste(strip, (0, H))
    return out


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        cand = f"{cur} {word}".strip()
        if cur and draw.textlength(cand, font=font) > width:
            lines.append(cur)
            cur = word
        else:
            cur = cand
    return lines + ([cur] if cur else [])


def draw_legend(width: int, *, has_gt: bool = True, scored: bool = True, counts: str | None = None,
                style: Style | None = None) -> Image.Image:
    """A white legend strip `width` px wide: a swatch per entry of `LEGEND` (those needing ground truth only when
    `has_gt`), then `counts` (e.g. "TP 2 FP 1 MISS 1") and, when `scored`, `SCORE_EXPLANATION`."""
    st = style or style_for(width, width)
    font = _font(st.font_size)
    pad = max(4, st.font_size // 2)
    sw = 2 * st.font_size  # swatch width
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = st.font_size + pad
    # lay the swatches out left to right, wrapping
    items, x, y = [], pad, pad
    for e in LEGEND:
        if e["needs_gt"] and not has_gt:
            continue
        label = e["label"] if has_gt or e["key"] != "pred" else "prediction: desc score"
        iw = sw + pad // 2 + int(probe.textlength(label, font=font)) + 2 * pad
        if x > pad and x + iw > width:
            x, y = pad, y + line_h
        items.append((x, y, e, label))
        x += iw
    y += line_h
    text_lines = ([counts] if counts else []) + (_wrap(probe, SCORE_EXPLANATION, font, width - 2 * pad)
                                                 if scored else [])
    height = y + len(text_lines) * line_h + pad // 2
    strip = Image.new("RGB", (width, height), LEGEND_BG)
    d = ImageDraw.Draw(strip)
    for x, y0, e, label in items:
        box = (x + st.halo, y0 + st.font_size // 4, x + sw - st.halo, y0 + st.font_size - st.font_size // 4)
        d.rectangle(box, fill=HALO_COLOUR)
        inner = (box[0] + st.halo, box[1] + st.halo, box[2] - st.halo, box[3] - st.halo)
        if e["style"] == "dashed":
            _dashed(d, inner, e["colour"], max(1, inner[3] - inner[1] + 1), st.dash)
        else:
            d.rectangle(inner, fill=e["colour"])
        d.text((x + sw + pad // 2, y0), label, fill=TEXT_COLOUR, font=font)
    for line in text_lines:
        d.text((pad, y), line, fill=TEXT_COLOUR, font=font)
        y += line_h
    return strip


def legend_html(has_gt: bool = True) -> str:
    """The legend as HTML (coloured swatches with the picture's line styles, and the score's meaning)."""
    parts = []
    for e in LEGEND:
        if e["needs_gt"] and not has_gt:
            continue
        parts.append(f"<span class='swatch' style='display:inline-block;width:2em;height:0.8em;"
                     f"border:3px {e['style']} {_hex(e['colour'])};outline:1px solid #000;margin:0 4px'></span>"
                     f"{html.escape(e['label'])}")
    return (f"<p class='legend'>{' &nbsp; '.join(parts)}</p>"
            f"<p class='legend-score'>{html.escape(SCORE_EXPLANATION)}</p>")


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
            "body{font-family:sans-serif} .grid{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0;width:520px}"
            "figure img{max-width:512px} figcaption{font-size:12px;white-space:pre-wrap} "
            ".summary td{padding:2px 8px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{legend_html()}" + "\n".join(rows) + "</body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------- attention heatmaps
# The spatial-linking module's attention (a box's `<|box_end|>` token over the merged visual tokens of its image)
# drawn over the image: one panel per box (`draw_attention`), or the image with every box followed by one panel
# per box side by side (`draw_attention_panels`). A merged visual token of Qwen3-VL covers a (patch x merge)²
# block of the resized image (32x32 px for patch 16, merge 2), its tokens in row-major order over the
# `grid_hw = (rows, cols)` grid of blocks (data/image.py `patchify`); the resized image covers the whole original,
# so token (r, c) covers columns [c W / cols, (c+1) W / cols) and rows [r H / rows, (r+1) H / rows) of any drawn
# picture W x H of the image.

KIND_NAMES = ("person", "object", "interaction", "other")  # the `kind` codes of the batch's `links` (0..3)
KIND_COLOURS = (GT_COLOUR, PRED_COLOUR, FP_COLOUR, MISS_COLOUR)  # light green, light blue, pink, light orange
HEAT_CMAP = "inferno"  # matplotlib colormap: black (no attention) to light yellow (the panel's largest weight)
HEAT_EXPLANATION = ("colour: the box token's attention weight on each visual token (mean over the heads; one box's "
                    "weights sum to 1), relative to the panel's largest weight (shown as max); the module attends "
                    "only to the tokens whose patch centre lies inside the box")


def token_cells(grid_hw: tuple[int, int], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_of_pixel [height], col_of_pixel [width]): the grid row / column of the visual token covering each
    pixel row / column of a `height` x `width` picture of the image (pixel centre (i + 0.5) mapped to
    floor((i + 0.5) * rows / height), the same for columns)."""
    rows, cols = (int(v) for v in grid_hw)
    if rows < 1 or cols < 1:
        raise ValueError(f"grid_hw must be positive (rows, cols), got {grid_hw}")
    r = np.minimum(((np.arange(height) + 0.5) * rows / height).astype(np.int64), rows - 1)
    c = np.minimum(((np.arange(width) + 0.5) * cols / width).astype(np.int64), cols - 1)
    return r, c


def attention_heat(weights, grid_hw: tuple[int, int], height: int, width: int) -> np.ndarray:
    """The attention over visual tokens as a density on the pixels of a `height` x `width` picture of the image.

    weights `[rows * cols]` (row-major over `grid_hw`, e.g. one box's weights averaged over the heads) ->
    `[height, width]` float64 where each token's weight is spread evenly over the pixels it covers
    (`token_cells`), so the sum over any region is the attention mass on it and the total equals weights.sum()
    (every token covers >= 1 pixel when height >= rows and width >= cols). Raises ValueError on a size mismatch
    or a picture smaller than the grid.
    """
    rows, cols = (int(v) for v in grid_hw)
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.size != rows * cols:
        raise ValueError(f"{w.size} attention weights for a {rows}x{cols} token grid")
    if height < rows or width < cols:
        raise ValueError(f"a {height}x{width} picture is smaller than the {rows}x{cols} token grid")
    r, c = token_cells((rows, cols), height, width)
    per_row = np.bincount(r, minlength=rows)  # pixels per grid row / column
    per_col = np.bincount(c, minlength=cols)
    density = w.reshape(rows, cols) / (per_row[:, None] * per_col[None, :])
    return density[r][:, c]


def box_mass(heat: np.ndarray, box) -> float:
    """Sum of `heat [H, W]` over the pixels whose centre lies inside `box` (x1, y1, x2, y2; pixels of the heat)."""
    H, W = heat.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    xs, ys = np.arange(W) + 0.5, np.arange(H) + 0.5
    inside = ((ys >= y1) & (ys <= y2))[:, None] & ((xs >= x1) & (xs <= x2))[None, :]
    return float(heat[inside].sum())


def _heat_rgb(img: Image.Image, heat: np.ndarray, alpha: float = 0.75) -> Image.Image:
    """The image dimmed to 40 % with the heat (normalised to its maximum) in `HEAT_CMAP` over it; the overlay's
    opacity grows with the heat (sqrt), so untouched regions stay readable."""
    from matplotlib import colormaps

    base = np.asarray(img.convert("RGB"), np.float64) * 0.4
    top = heat.max()
    v = heat / top if top > 0 else np.zeros_like(heat)
    col = colormaps[HEAT_CMAP](v)[..., :3] * 255.0
    a = alpha * np.sqrt(v)[..., None]
    return Image.fromarray(np.clip(base * (1 - a) + col * a, 0, 255).round().astype(np.uint8))


def _kind_of(kind) -> tuple[str, tuple]:
    k = int(kind) if kind is not None else 3
    k = k if 0 <= k < len(KIND_NAMES) else 3
    return KIND_NAMES[k], KIND_COLOURS[k]


def _outlined_box(draw, box, colour, st: Style, label: str | None, font, W, H, below: bool = False):
    """A solid box outline with a black halo (the prediction style of `draw_prediction`) and a label above it
    (`below`: under it)."""
    w, h = st.line, st.halo
    _rect(draw, box, HALO_COLOUR, w + 2 * h, grow=h)
    _rect(draw, box, colour, w)
    if label:
        top = box[3] + h + 1 if below else box[1] - h - 1
        _label(draw, label, box[0] - h, top, colour, st, font, W, H, below=below)


def draw_attention(image: Image.Image, weights, grid_hw: tuple[int, int], box, *, kind: int | None = None,
                   label: str | None = None, min_side: int = 384) -> Image.Image:
    """One heatmap panel: `weights [rows * cols]` over the image's visual tokens (`attention_heat`) drawn over
    `image`, with `box` (pixels of `image`, x1 y1 x2 y2) outlined in its kind's colour (`KIND_COLOURS`: person
    light green, object light blue, interaction pink, other light orange) and labelled "<label or kind> max <w>"
    (the panel's largest token weight: the colours are relative to it). The image is upscaled (nearest) to
    `min_side` first, as `draw_prediction` does. Returns a new RGB image."""
    scale = max(1.0, min_side / max(image.width, image.height))
    img = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    W, H = img.size
    w = np.asarray(weights, np.float64).reshape(-1)
    out = _heat_rgb(img, attention_heat(w, grid_hw, H, W))
    st = style_for(W, H)
    name, colour = _kind_of(kind)
    b = _box({"bbox": box}, scale)
    if b is not None:
        _outlined_box(ImageDraw.Draw(out), b, colour, st, f"{label or name} max {w.max():.2f}", _font(st.font_size),
                      W, H)
    return out


def draw_attention_panels(image: Image.Image, panels: Sequence[dict], grid_hw: tuple[int, int], *,
                          min_side: int = 384, legend: bool = True) -> Image.Image:
    """Side by side: the image with every box outlined, then one `draw_attention` panel per entry of `panels`
    ({"weights" [rows * cols], "box" (pixels of `image`), optional "kind" (0 person, 1 object, 2 interaction,
    3 other), optional "label"}), e.g. the person, object and interaction boxes of one pair; with `legend`, a
    strip below with the colour bar and `HEAT_EXPLANATION`. Returns a new RGB image."""
    scale = max(1.0, min_side / max(image.width, image.height))
    first = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    W, H = first.size
    st = style_for(W, H)
    font = _font(st.font_size)
    d = ImageDraw.Draw(first)
    for p in panels:
        b = _box({"bbox": p["box"]}, scale)
        name, colour = _kind_of(p.get("kind"))
        if b is not None:  # the interaction box (the union) shares its top-left corner with a member: label below
            _outlined_box(d, b, colour, st, p.get("label") or name, font, W, H, below=p.get("kind") == 2)
    tiles = [first] + [draw_attention(image, p["weights"], grid_hw, p["box"], kind=p.get("kind"),
                                      label=p.get("label"), min_side=min_side) for p in panels]
    gap = max(4, st.line * 2)
    total_w = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    strip = _heat_legend(total_w, st) if legend else None
    out = Image.new("RGB", (total_w, H + (strip.height if strip else 0)), LEGEND_BG)
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    if strip is not None:
        out.paste(strip, (0, H))
    return out


def _heat_legend(width: int, st: Style) -> Image.Image:
    """A white strip: the colour bar (0 -> the panel's max) and `HEAT_EXPLANATION`, wrapped to `width`."""
    from matplotlib import colormaps

    font = _font(st.font_size)
    pad = max(4, st.font_size // 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    bar_w = min(width - 2 * pad, 12 * st.font_size)
    lines = _wrap(probe, HEAT_EXPLANATION, font, width - 2 * pad)
    line_h = st.font_size + pad
    height = pad + st.font_size + pad + len(lines) * line_h
    strip = Image.new("RGB", (width, height), LEGEND_BG)
    d = ImageDraw.Draw(strip)
    d.text((pad, pad), "0", fill=TEXT_COLOUR, font=font)
    x0 = pad + int(d.textlength("0 ", font=font))
    ramp = (colormaps[HEAT_CMAP](np.linspace(0, 1, bar_w))[:, :3] * 255).round().astype(np.uint8)
    strip.paste(Image.fromarray(np.repeat(ramp[None], st.font_size, 0)), (x0, pad))
    d.text((x0 + bar_w + pad // 2, pad), "max", fill=TEXT_COLOUR, font=font)
    y = pad + st.font_size + pad
    for line in lines:
        d.text((pad, y), line, fill=TEXT_COLOUR, font=font)
        y += line_h
    return strip


def heat_legend_html() -> str:
    """The heatmaps' legend as HTML: the colour bar (`HEAT_CMAP`, 0 to the panel's max), the box colours of the
    kinds and `HEAT_EXPLANATION`."""
    from matplotlib import colormaps

    stops = ",".join(_hex((np.asarray(colormaps[HEAT_CMAP](t)[:3]) * 255).round().astype(int)) for t in
                     np.linspace(0, 1, 6))
    kinds = " &nbsp; ".join(f"<span style='display:inline-block;width:2em;height:0.8em;border:3px solid "
                            f"{_hex(c)};outline:1px solid #000;margin:0 4px'></span>{html.escape(n)}"
                            for n, c in zip(KIND_NAMES[:3], KIND_COLOURS[:3]))
    return (f"<p class='legend'>attention heatmaps: 0 <span style='display:inline-block;width:10em;height:0.8em;"
            f"background:linear-gradient(to right,{stops})'></span> max &nbsp; {kinds}</p>"
            f"<p class='legend-score'>{html.escape(HEAT_EXPLANATION)}</p>")
