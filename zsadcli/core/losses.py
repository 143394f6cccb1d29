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


def focal_bce(probs: torch.Tensor, target: torch.Tensor, gamma: float = 4.0,
              grad_target: torch.Tensor | None = None) -> torch.Tensor:
    """Binary focal loss on probabilities: mean(BCE(p, t) * (1 - p_t)^gamma), p_t = p t + (1-p)(1-t),
    no alpha (BSR-CLIP / AF-CLIP's ``focal_loss``).

    ``grad_target``: a target that autograd's backward sees in place of ``target`` where the
    reference multiplies by it (the BCE gradient (p - t) / (p (1 - p)) and the ``p * t`` term of
    p_t); the value is unchanged. BSR-CLIP's training needs this: its patch-alignment loss rewrites
    the ground truth in place (0 -> -1) after this loss was computed and before backward.
    """
    import torch.nn.functional as F

    probs = probs.float()
    target = target.float()
    ce = F.binary_cross_entropy(probs, target, reduction="none")
    p_t = probs * target + (1 - probs) * (1 - target)
    if grad_target is not None:
        grad_target = grad_target.float()
        ce = _BCEGradient.apply(probs, grad_target) + ce.detach()
        p_t_grad = probs * grad_target + (1 - probs) * (1 - target)
        p_t = p_t_grad + (p_t - p_t_grad).detach()
    return (ce * (1 - p_t) ** gamma).mean()


class _BCEGradient(torch.autograd.Function):
    """Zero in value; backward is torch's BCE gradient (p - t) / max(p (1 - p), 1e-12) for any t
    (F.binary_cross_entropy refuses targets outside [0, 1])."""

    @staticmethod
    def forward(ctx, probs, target):
        ctx.save_for_backward(probs, target)
        return torch.zeros_like(probs)

    @staticmethod
    def backward(ctx, grad):
        probs, target = ctx.saved_tensors
        return grad * (probs - target) / ((1 - probs) * probs).clamp_min(1e-12), None


def layered_focal_dice(prob_maps: list[torch.Tensor], masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over layers of focal(2-class probability maps) + dice(anomalous channel), the loss of
    the linear-head methods (April-GAN, CLIP-AD SDP+); also the parts, for the training log."""
    gt = masks.float()
    focal = sum(focal_loss(p, gt) for p in prob_maps)
    dice = sum(dice_loss(p[:, 1], gt) for p in prob_maps)
    return focal + dice, {"focal": float(focal.detach()), "dice": float(dice.detach())}
