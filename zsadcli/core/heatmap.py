"""Anomaly map -> overlay PNG: the image, a jet heatmap blended over it, a colour bar and a
caption with the image score (and the decision when a threshold is given).

Layout (README, "Heatmap overlays"): the overlay keeps the image's own pixels and size in the
top-left corner; the colour bar with its two value labels sits in a panel to the right and the
caption in a strip below. Panel, strip and text scale with the image's longer side (a TrueType
font, Pillow's bundled one, about 2.5 % of that side, at least 10 px), and their sizes depend
only on the image size, never on the caption: a long caption is set in a smaller font, over at
most two lines. Tiny images get a minimum canvas so that labels and caption never overlap.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TEXT_FRACTION = 0.025  # text and bar size, as a fraction of the image's longer side
MIN_TEXT_PX = 10
MIN_CANVAS_WIDTH = 256
LABEL_TEMPLATE = "-00.00"  # the widest tick label the panel is sized for
CAPTION_LINES = 2


def jet(values: np.ndarray) -> np.ndarray:
    """matplotlib's 'jet' (piecewise linear), values in [0, 1] -> uint8 RGB."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def normalise_map(amap: np.ndarray, mode: str, value_range: tuple[float, float]) -> tuple[np.ndarray, tuple[float, float]]:
    """``fixed``: the method's own score scale (a normal image stays blue); ``image``: min-max."""
    if mode == "image":
        lo, hi = float(amap.min()), float(amap.max())
    else:
        lo, hi = value_range
    scaled = (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)
    return np.clip(scaled, 0.0, 1.0), (lo, hi)


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class OverlayLayout:
    """Pixel boxes (left, top, right, bottom) of each part of the overlay canvas."""

    canvas: tuple[int, int]
    image: tuple[int, int, int, int]
    bar: tuple[int, int, int, int]
    high_label: tuple[int, int, int, int]
    low_label: tuple[int, int, int, int]
    caption: tuple[int, int, int, int]
    text_px: int


def overlay_layout(width: int, height: int) -> OverlayLayout:
    """Where everything goes for a ``width`` x ``height`` image (a function of the size alone)."""
    text_px = max(MIN_TEXT_PX, round(max(width, height) * TEXT_FRACTION))
    line = round(text_px * 1.3)
    gap = max(3, text_px // 2)
    label_width = int(np.ceil(_font(text_px).getlength(LABEL_TEMPLATE)))
    bar_height = max(height, 3 * line)  # room for both labels apart, even for a 1 px image
    bar_left = width + gap
    label_left = bar_left + text_px + gap
    canvas_width = max(label_left + label_width + gap, MIN_CANVAS_WIDTH)
    caption_top = bar_height + gap
    canvas_height = caption_top + CAPTION_LINES * line + gap
    return OverlayLayout(
        canvas=(canvas_width, canvas_height), image=(0, 0, width, height),
        bar=(bar_left, 0, bar_left + text_px, bar_height),
        high_label=(label_left, 0, label_left + label_width, line),
        low_label=(label_left, bar_height - line, label_left + label_width, bar_height),
        caption=(gap, caption_top, canvas_width - gap, caption_top + CAPTION_LINES * line), text_px=text_px)


def _fit_caption(parts: list[str], box_width: int, text_px: int) -> tuple[ImageFont.FreeTypeFont, list[str]]:
    """The largest font (<= text_px) at which the parts, wrapped greedily between parts, fit the
    caption box in CAPTION_LINES lines."""
    size = text_px
    while True:
        font = _font(size)
        lines: list[str] = []
        for part in parts:
            if lines and font.getlength(lines[-1] + "  " + part) <= box_width:
                lines[-1] += "  " + part
            else:
                lines.append(part)
        if size <= 6 or (len(lines) <= CAPTION_LINES and all(font.getlength(l) <= box_width for l in lines)):
            return font, lines[:CAPTION_LINES]
        size -= 1


def render_overlay(image: Image.Image, amap: np.ndarray, *, score: float, normalize: str = "fixed",
                   value_range: tuple[float, float] = (0.0, 1.0), threshold: float | None = None,
                   alpha: float = 0.5, mask: np.ndarray | None = None) -> Image.Image:
    """An RGB canvas: the image at its own resolution with the heatmap blended over it, a colour
    bar and a caption strip (``overlay_layout``); ``mask`` (bool, the image's size): a calibrated
    defect mask, drawn as an outline."""
    base = image.convert("RGB")
    width, height = base.size
    scaled, (lo, hi) = normalise_map(amap.astype(np.float32), normalize, value_range)
    resized = np.asarray(Image.fromarray(scaled, mode="F").resize((width, height), Image.BILINEAR))
    blended = (1 - alpha) * np.asarray(base, np.float32) + alpha * jet(resized).astype(np.float32)
    overlay = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
    overlay = draw_mask_outline(overlay, mask)

    layout = overlay_layout(width, height)
    canvas = Image.new("RGB", layout.canvas, "white")
    canvas.paste(overlay, layout.image[:2])
    left, top, right, bottom = layout.bar
    ramp = np.linspace(1.0, 0.0, bottom - top, dtype=np.float32)[:, None].repeat(right - left, axis=1)
    canvas.paste(Image.fromarray(jet(ramp)), (left, top))
    draw = ImageDraw.Draw(canvas)
    font = _font(layout.text_px)
    draw.text(layout.high_label[:2], f"{hi:.2f}", fill="black", font=font)
    draw.text(layout.low_label[:2], f"{lo:.2f}", fill="black", font=font)

    parts = [f"score {score:.3f}"]
    if threshold is not None:
        parts.append(f"{'ANOMALOUS' if score >= threshold else 'normal'} (threshold {threshold:g})")
    parts.append(f"map scale: {'per-image min-max' if normalize == 'image' else 'fixed'}")
    cap_left, cap_top, cap_right, cap_bottom = layout.caption
    caption_font, lines = _fit_caption(parts, cap_right - cap_left, layout.text_px)
    line_height = (cap_bottom - cap_top) // CAPTION_LINES
    for index, text in enumerate(lines):
        draw.text((cap_left, cap_top + index * line_height), text, fill="black", font=caption_font)
    return canvas


OUTLINE_COLOUR = (255, 0, 255)  # magenta: absent from the jet colour map


def draw_mask_outline(image: Image.Image, mask: np.ndarray | None) -> Image.Image:
    """``image`` with the boundary of the binary ``mask`` (same size) drawn over it, about
    1/200 of the image wide; unchanged when there is no mask."""
    if mask is None or not mask.any():
        return image
    from scipy import ndimage

    width = max(1, round(max(image.size) / 200))
    boundary = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
    pixels = np.array(image.convert("RGB"))
    pixels[boundary] = OUTLINE_COLOUR
    return Image.fromarray(pixels)
