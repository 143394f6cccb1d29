"""Anomaly-map post-processing: upsampling, Gaussian smoothing, normalisation for display."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def upsample(maps: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size), align_corners False as in every reference."""
    return F.interpolate(maps, size=(size, size), mode=mode, align_corners=False)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's kernel: exp(-x^2 / 2 sigma^2), radius int(truncate * sigma + 0.5), normalised."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices for scipy's 'reflect' (half-sample symmetric: d c b a | a b c d | d c b a)."""
    idx = torch.arange(-radius, n + radius, device=device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


def gaussian_smooth(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Per-image Gaussian blur equal to ``scipy.ndimage.gaussian_filter(m, sigma)`` (mode reflect).

    On the CPU scipy itself runs (bit-identical to the official code, which calls it);
    on a GPU a separable float64 convolution with the same kernel and padding runs there.
    """
    if sigma <= 0:
        return maps
    from zsadcli.core.graph import capturing

    if capturing():  # an exported graph: float32 convolutions (runtimes lack float64 ones)
        return gaussian_smooth_torch(maps, sigma, truncate, compute_dtype=torch.float32)
    if maps.device.type == "cpu":
        from scipy.ndimage import gaussian_filter

        out = np.stack([gaussian_filter(m, sigma=sigma, truncate=truncate)
                        for m in maps.detach().float().numpy()])
        return torch.from_numpy(out)
    return gaussian_smooth_torch(maps, sigma, truncate)


def gaussian_smooth_torch(maps: torch.Tensor, sigma: float, truncate: float = 4.0,
                          compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The same blur as separable convolutions (float64 unless told) on the maps' device."""
    kernel = gaussian_kernel1d(sigma, truncate).to(device=maps.device, dtype=compute_dtype).view(1, 1, -1)
    radius = (kernel.numel() - 1) // 2
    batch, height, width = maps.shape
    x = maps.detach().to(compute_dtype)[:, _reflect_index(height, radius, maps.device)]
    x = F.conv1d(x.transpose(1, 2).reshape(-1, 1, x.shape[1]), kernel)  # along rows
    x = x.reshape(batch, width, height).transpose(1, 2)[:, :, _reflect_index(width, radius, maps.device)]
    x = F.conv1d(x.reshape(-1, 1, x.shape[2]), kernel)  # along columns
    return x.reshape(batch, height, width).to(maps.dtype)
