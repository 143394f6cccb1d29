"""Slow, obvious reference implementations for tests/test_metrics.py.

Written independently of zsadcli.core.metrics (own flood-fill labelling, explicit loops over
thresholds and regions), so that both have to agree by definition, not by shared code.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import auc


def label_regions_8(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Pixel lists of the 8-connected regions of one 2-D mask, in raster order of discovery."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for i in range(h):
        for j in range(w):
            if not mask[i, j] or seen[i, j]:
                continue
            seen[i, j] = True
            stack, pixels = [(i, j)], []
            while stack:
                a, b = stack.pop()
                pixels.append((a, b))
                for da in (-1, 0, 1):
                    for db in (-1, 0, 1):
                        y, x = a + da, b + db
                        if 0 <= y < h and 0 <= x < w and mask[y, x] and not seen[y, x]:
                            seen[y, x] = True
                            stack.append((y, x))
            regions.append(pixels)
    return regions


def _regions_of_class(masks: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    out = []
    for m, mask in enumerate(masks):
        for pixels in label_regions_8(mask.astype(bool)):
            rows, cols = np.array(pixels).T
            out.append((m, rows, cols))
    return out


def ref_aupro_exact(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """MVTec AU-PRO: one curve point per distinct score (predict s >= t), trapezoid to the limit."""
    masks = masks.astype(bool)
    regions = _regions_of_class(masks)
    normal = ~masks
    n_normal = normal.sum()
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(np.logical_and(pred, normal).sum() / n_normal)
        pros.append(np.mean([pred[m, r, c].sum() / len(r) for m, r, c in regions]))
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_cut = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_cut) / 2
            break
    return area / fpr_limit


def ref_pro_200(masks: np.ndarray, maps: np.ndarray, rescale: str) -> float:
    """cflow-ad ``cal_pro_score`` (rescale="minmax") / BSR-CLIP ``compute_pro`` ("max")."""
    masks = masks.astype(bool)
    regions = _regions_of_class(masks)  # the original relabels per threshold: same regions
    lo, hi = maps.min(), maps.max()
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / 200):
        binary = maps > th
        pros.append(np.array([binary[m, r, c].sum() / len(r) for m, r, c in regions]).mean())
        fprs.append(np.logical_and(~masks, binary).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    x = fprs[keep]
    x = (x - x.min()) / (x.max() - x.min()) if rescale == "minmax" else x / x.max()
    return auc(x, pros[keep])
