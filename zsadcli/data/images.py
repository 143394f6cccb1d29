"""Reading images and masks the way the reference implementations do, with clear errors.

Preprocessing follows the official ViT-L/14 pipelines: squash-resize with PIL bicubic (which
antialiases when downscaling) in the image's own mode, then RGB, ToTensor, OpenAI mean/std.
EXIF orientation is ignored, as in every official loader (scores must match theirs).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from zsadcli.errors import BadInput

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image; missing, empty or corrupt files raise BadInput naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"image {path} does not exist.", hint="check the path (and meta.json's img_path)")
    if path.stat().st_size == 0:
        raise BadInput(f"image {path} is an empty (zero-byte) file.", hint="re-copy or remove it")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadInput(f"image {path} cannot be decoded ({exc}).", hint="re-copy it or remove it from the input") from None
    return img


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
    """``convert('L') > 0`` -> 0/255: label images with small integers (VisA) become binary first."""
    array = np.asarray(mask.convert("L")) > 0
    return Image.fromarray(array.astype(np.uint8) * 255, mode="L")


def load_mask(path: str | os.PathLike | None, size: int, resample: str = "bilinear") -> torch.Tensor:
    """Ground truth at the model size: binarise, resize (bilinear; BSR bicubic), ``> 0.5``.

    ``None`` (normal item) or a directory (the official loaders' "no mask") gives all zeros.
    """
    if path is None or str(path) == "" or Path(path).is_dir():
        return torch.zeros(size, size, dtype=torch.bool)
    return mask_to_tensor(open_image(path), size, resample)


def mask_to_tensor(mask: Image.Image, size: int, resample: str = "bilinear") -> torch.Tensor:
    """A decoded mask image at the model size: binarise, resize, ``> 0.5`` (as ``load_mask``)."""
    resized = binarize_mask_image(mask).resize((size, size), _RESAMPLE[resample])
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0 > 0.5)
