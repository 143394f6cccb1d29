"""Segmentation and classification losses shared by the trained methods."""
from __future__ import annotations

import torch


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on class *probabilities* (B, C, H, W) against integer targets (B, H, W).

    The formulation AnomalyCLIP/Crane/ViP² use (Hsuxu's Loss_ToolBox): one-hot targets clamped to
    [smooth/(C-1), 1-smooth], p_t = sum(onehot * p) + smooth, loss = -(1 - p_t)^gamma log p_t,
    alpha = 1 for every class, mean over pixels.
    """
    classes = probs.shape[1]
    flat = probs.permute(0, 2, 3, 1).reshape(-1, classes)
    onehot = torch.zeros_like(flat).scatter_(1, target.reshape(-1, 1).long(), 1.0)
    onehot = onehot.clamp(smooth / (classes - 1), 1.0 - smooth)
    pt = (onehot * flat).sum(1) + smooth
    return (-torch.pow(1 - pt, gamma) * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 sum(p g) + 1) / (sum p + sum g + 1) per image, averaged over the batch."""
    batch = target.shape[0]
    p = pred.reshape(batch, -1)
    g = target.reshape(batch, -1).to(p.dtype)
    dice = (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return 1 - dice.sum() / batch
