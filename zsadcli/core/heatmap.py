"""Anomaly map -> overlay PNG: the image, a jet heatmap blended over it, a colour bar and a
caption with the image score (and the decision when a threshold is given)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BAR_WIDTH = 16
MARGIN = 6


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


def render_overlay(image: Image.Image, amap: np.ndarray, *, score: float, normalize: str = "fixed",
                   value_range: tuple[float, float] = (0.0, 1.0), threshold: float | None = None,
                   alpha: float = 0.5, mask: np.ndarray | None = None) -> Image.Image:
    """An RGB image at the input's own resolution plus a colour bar and a caption strip;
    ``mask`` (bool, the image's size): a calibrated defect mask, drawn as an outline."""
    base = image.convert("RGB")
    width, height = base.size
    scaled, (lo, hi) = normalise_map(amap.astype(np.float32), normalize, value_range)
    resized = np.asarray(Image.fromarray(scaled, mode="F").resize((width, height), Image.BILINEAR))
    blended = (1 - alpha) * np.asarray(base, np.float32) + alpha * jet(resized).astype(np.float32)
    overlay = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
    overlay = draw_mask_outline(overlay, mask)

    font = ImageFont.load_default()
    caption = f"score {score:.3f}"
    if threshold is not None:
        caption += f"  {'ANOMALOUS' if score >= threshold else 'normal'} (threshold {threshold:g})"
    caption += f"  map scale: {'per-image min-max' if normalize == 'image' else 'fixed'}"
    label_width = 44
    caption_height = 18
    caption_width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(caption, font=font)) + 4
    canvas_width = max(width + MARGIN + BAR_WIDTH + label_width, caption_width)
    canvas = Image.new("RGB", (canvas_width, height + caption_height), "white")
    canvas.paste(overlay, (0, 0))
    ramp = np.linspace(1.0, 0.0, max(height, 2), dtype=np.float32)[:, None].repeat(BAR_WIDTH, axis=1)
    canvas.paste(Image.fromarray(jet(ramp)), (width + MARGIN, 0))
    draw = ImageDraw.Draw(canvas)
    text_x = width + MARGIN + BAR_WIDTH + 3
    draw.text((text_x, 0), f"{hi:.2f}", fill="black", font=font)
    draw.text((text_x, max(0, height - 12)), f"{lo:.2f}", fill="black", font=font)
    draw.text((2, height + 3), caption, fill="black", font=font)
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
