"""Reading images and masks the way the reference implementations do, with clear errors.

Preprocessing follows the official ViT-L/14 pipelines: squash-resize with PIL bicubic (which
antialiases when downscaling) in the image's own mode, then RGB, ToTensor, OpenAI mean/std.

Every image and mask zsad reads goes through ``open_image`` / ``open_mask`` (predict, eval, train,
prepare --check), which apply one rule set (README, "Image files"):
- EXIF orientation is applied (``ImageOps.exif_transpose``), to images and masks alike; the
  benchmark sets carry no orientation tag, so their scores are unchanged;
- 16-bit images (Pillow modes ``I;16*``, and ``I`` within 0..65535) map 0..65535 onto 0..255
  (divide by 257, rounded); float images (mode ``F``) with values in [0, 1] are scaled by 255,
  other float or 32-bit integer ranges are min-max scaled per image; 8-bit modes are untouched;
- masks are binarised on their decoded values (> 0) before any scaling, so 16-bit and float
  masks with small label values stay masks;
- images above ``max_image_pixels()`` pixels (default 178,956,970, Pillow's own limit, about
  13,000 x 13,000; ``ZSAD_MAX_IMAGE_PIXELS`` or ``zsad --max-image-pixels N`` raise it) are refused
  from their header, before decoding.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from zsadcli.errors import BadInput

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # Pillow's DecompressionBombError threshold (2 x 89,478,485)
_max_pixels_override: int | None = None


def set_max_image_pixels(limit: int | None) -> None:
    """The global option ``--max-image-pixels`` (None: back to the environment / default)."""
    global _max_pixels_override
    _max_pixels_override = limit


def max_image_pixels() -> int:
    """The largest image (width x height) zsad decodes: --max-image-pixels, else
    $ZSAD_MAX_IMAGE_PIXELS, else DEFAULT_MAX_IMAGE_PIXELS."""
    if _max_pixels_override is not None:
        return _max_pixels_override
    raw = os.environ.get("ZSAD_MAX_IMAGE_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise BadInput(f"ZSAD_MAX_IMAGE_PIXELS={raw!r} is not a positive whole number of pixels.",
                       hint=f"e.g. ZSAD_MAX_IMAGE_PIXELS=400000000 (the default is {DEFAULT_MAX_IMAGE_PIXELS:,})")
    return value


def _open_header(path: Path, what: str) -> Image.Image:
    """Image.open (header only) with zsad's size limit in place of Pillow's bomb check."""
    if not path.is_file():
        field = "mask_path" if what == "mask" else "img_path"
        raise BadInput(f"{what} {path} does not exist.", hint=f"check the path (in a dataset: meta.json's {field})")
    if path.stat().st_size == 0:
        raise BadInput(f"{what} {path} is an empty (zero-byte) file.", hint="re-copy or remove it")
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # zsad applies its own, documented limit just below
    try:
        img = Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"{what} {path} cannot be decoded ({exc}).",
                       hint="re-copy it or remove it from the input") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    limit = max_image_pixels()
    if img.width * img.height > limit:
        img.close()
        raise BadInput(f"{what} {path} is {img.width} x {img.height} = {img.width * img.height:,} pixels, above "
                       f"zsad's limit of {limit:,} (a guard against decompression bombs).",
                       hint="if the file is genuine, raise the limit: zsad --max-image-pixels N ... "
                            "or ZSAD_MAX_IMAGE_PIXELS=N")
    return img


def _decode(path: Path, what: str) -> Image.Image:
    img = _open_header(path, what)
    try:
        img.load()
        return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"{what} {path} cannot be decoded ({exc}).",
                       hint="re-copy it or remove it from the input") from None


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_eight_bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images as 8-bit "L" by their real range (module docstring);
    8-bit modes unchanged. Pillow's own convert would clip them to white or black."""
    if img.mode not in (*_SIXTEEN_BIT, "I", "F"):
        return img
    values = np.asarray(img, dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode in _SIXTEEN_BIT or (img.mode == "I" and lo >= 0 and hi <= 65535):
        scaled = values / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), mode="L")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, EXIF orientation applied, 16-bit/float converted to 8 bit by
    their range; missing, empty, corrupt or over-large files raise BadInput naming the file."""
    return to_eight_bit(_decode(Path(path), "image"))


def open_mask(path: str | os.PathLike) -> Image.Image:
    """A ground-truth mask as binary "L" (0/255): EXIF orientation applied like its image's, then
    binarised on the decoded values (> 0), whatever the bit depth."""
    return binarize_mask_image(_decode(Path(path), "mask"))


def image_size(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """(width, height) as open_image/open_mask will return it (EXIF rotation included), from the
    header only; the same errors as open_image for unreadable or over-large files."""
    with _open_header(Path(path), what) as img:
        orientation = img.getexif().get(0x0112, 1)
        return (img.height, img.width) if orientation in (5, 6, 7, 8) else img.size


def to_normalized_tensor(img: Image.Image, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """RGB conversion, ToTensor (uint8 / 255) and Normalize, as torchvision computes them."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub(mean_t).div(std_t)


def clip_preprocess(img: Image.Image, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """(3, size, size): PIL bicubic squash-resize in the image's own mode, then RGB + normalise
    (the order of the official transforms: resize first, RGB conversion after)."""
    return to_normalized_tensor(img.resize((size, size), Image.BICUBIC), mean, std)


def binarize_mask_image(mask: Image.Image) -> Image.Image:
    """``convert('L') > 0`` -> 0/255: label images with small integers (VisA) become binary first.
    16-bit, 32-bit and float masks are compared on their own values (converting them to "L" first
    would clip or round small labels away)."""
    if mask.mode in (*_SIXTEEN_BIT, "I", "F"):
        array = np.nan_to_num(np.asarray(mask, dtype=np.float64)) > 0
    else:
        array = np.asarray(mask.convert("L")) > 0
    return Image.fromarray(array.astype(np.uint8) * 255, mode="L")


def load_mask(path: str | os.PathLike | None, size: int, resample: str = "bilinear") -> torch.Tensor:
    """Ground truth at the model size: binarise, resize (bilinear; BSR bicubic), ``> 0.5``.

    ``None`` (normal item) or a directory (the official loaders' "no mask") gives all zeros.
    """
    if path is None or str(path) == "" or Path(path).is_dir():
        return torch.zeros(size, size, dtype=torch.bool)
    return mask_to_tensor(open_mask(path), size, resample)


def mask_to_tensor(mask: Image.Image, size: int, resample: str = "bilinear") -> torch.Tensor:
    """A decoded mask image at the model size: binarise, resize, ``> 0.5`` (as ``load_mask``)."""
    resized = binarize_mask_image(mask).resize((size, size), _RESAMPLE[resample])
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0 > 0.5)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths, in order."""
    paths: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise BadInput(f"folder {path} contains no images ({', '.join(IMAGE_EXTENSIONS)}).")
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        elif any(ch in spec for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True)
                           if Path(p).suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise BadInput(f"pattern {spec!r} matches no images.")
            paths.extend(found)
        else:
            raise BadInput(f"image {path} does not exist.", hint="give image files, folders or glob patterns")
    return paths
