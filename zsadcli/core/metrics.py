"""Evaluation metrics for zero-shot anomaly detection.

Pure functions in the style of ``sklearn.metrics``: they take ground truth first, scores
second, and return floats. Inputs may be numpy arrays or torch tensors; CUDA tensors are
evaluated on their GPU with torch, everything else with numpy on the CPU (numpy's sort is an
order of magnitude faster than torch's on the CPU).

Image level (1-D labels and scores) and pixel level (``masks``/``maps`` of shape (M, H, W),
all pixels of one class pooled) share one preparation: the scores of negatives and of
positives are sorted once, and every metric is read off those two sorted arrays with binary
searches and integer counts (int64). No per-threshold copies of the data are made.

AUPRO comes in three variants (see ``AUPRO_VARIANTS``), which give different numbers:

- ``exact``: the MVTec AD definition (every distinct score is a threshold, 8-connected
  regions, trapezoid up to FPR 0.3 with interpolation at the cut, divided by 0.3).
- ``compat200``: cflow-ad's ``cal_pro_score`` as used by AnomalyCLIP, Crane and ViP²-CLIP
  (200 evenly spaced thresholds, FPR < 0.3 kept and min-max rescaled).
- ``bsr200``: BSR-CLIP's ``compute_pro`` (as compat200, but FPR divided by its maximum).

Undefined values are NaN with an ``UndefinedMetric`` warning, never 0, and ``class_mean``
leaves them out and reports how many classes it averaged.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "AUPRO_VARIANTS",
    "F1Max",
    "UndefinedMetric",
    "aupro",
    "aupro_bsr200",
    "aupro_compat200",
    "auroc",
    "average_precision",
    "class_mean",
    "f1_max",
    "image_decision_metrics",
    "image_metrics",
    "pixel_decision_metrics",
    "pixel_metrics",
    "rates_at_threshold",
]

Array = np.ndarray | torch.Tensor


class UndefinedMetric(UserWarning):
    """A metric is undefined for the data it was given; its value is NaN."""


class F1Max(NamedTuple):
    """Best F1 over all thresholds; predict anomalous when ``score >= threshold``."""

    value: float
    threshold: float


def _undefined(metric: str, reason: str) -> float:
    warnings.warn(f"{metric} is undefined ({reason}); reporting NaN", UndefinedMetric, stacklevel=3)
    return math.nan


# --------------------------------------------------------------------------- backends
# The handful of array operations the metrics need, for numpy (CPU) and torch (GPU).


class _NumpyOps:
    @staticmethod
    def sort(x: np.ndarray) -> np.ndarray:
        x.sort()  # callers pass fresh copies (boolean indexing); in place saves one copy
        return x

    @staticmethod
    def sort_with(x: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(x)  # ties may come in any order: everything below aggregates them
        return x[order], other[order]

    @staticmethod
    def searchsorted(a: np.ndarray, v: Any, right: bool = False) -> np.ndarray:
        return np.searchsorted(a, v, side="right" if right else "left")

    @staticmethod
    def bincount(x: np.ndarray, minlength: int) -> np.ndarray:
        return np.bincount(x, minlength=minlength)

    @staticmethod
    def clamp0(x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0)

    @staticmethod
    def f64(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64)

    @staticmethod
    def argmax(x: np.ndarray) -> int:
        return int(np.argmax(x))

    @staticmethod
    def put(x: np.ndarray, like: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def numpy(x: Any) -> Any:
        return x


class _TorchOps:
    @staticmethod
    def sort(x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x).values

    @staticmethod
    def sort_with(x: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, order = torch.sort(x)
        return values, other[order]

    @staticmethod
    def searchsorted(a: torch.Tensor, v: torch.Tensor, right: bool = False) -> torch.Tensor:
        return torch.searchsorted(a, v, right=right)

    @staticmethod
    def bincount(x: torch.Tensor, minlength: int) -> torch.Tensor:
        return torch.bincount(x, minlength=minlength)

    @staticmethod
    def clamp0(x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)

    @staticmethod
    def f64(x: torch.Tensor) -> torch.Tensor:
        return x.double()

    @staticmethod
    def argmax(x: torch.Tensor) -> int:
        return int(torch.argmax(x))

    @staticmethod
    def put(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(x, device=like.device)

    @staticmethod
    def numpy(x: torch.Tensor) -> Any:
        return x.cpu().numpy()[()]  # 0-d becomes a numpy scalar that keeps the dtype


_Ops = type[_NumpyOps] | type[_TorchOps]


def _on_gpu(x: Array) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cuda"


def _scores(x: Array, ops: _Ops) -> Array:
    """Flat floating-point scores on the backend; rejects NaN/inf (they have no rank)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
    if ops is _TorchOps:
        s = x.reshape(-1)
        if s.dtype == torch.bfloat16:
            s = s.float()  # exact: every bf16 value is a float32 value
        elif not s.is_floating_point():
            s = s.double()
        finite = bool(torch.isfinite(s).all())
    else:
        if isinstance(x, torch.Tensor):
            x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
        s = x.reshape(-1)
        if s.dtype.kind != "f":
            s = s.astype(np.float64)
        finite = bool(np.isfinite(s).all())
    if not finite:
        raise ValueError("scores contain NaN or infinite values")
    return s


def _labels(y: Array, ops: _Ops, like: Array) -> Array:
    """Flat boolean labels on the scores' backend; anything but 0/1 is an error."""
    if isinstance(y, torch.Tensor):
        y = y.detach().to(like.device) if ops is _TorchOps else y.detach().cpu().numpy()
    elif ops is _TorchOps:
        y = torch.as_tensor(np.asarray(y), device=like.device)
    y = y.reshape(-1)
    if y.dtype != (torch.bool if ops is _TorchOps else np.bool_):
        binary = (y == 0) | (y == 1)
        if not bool(binary.all()):
            raise ValueError("labels/masks must be binary (0/1 or bool); binarise masks first")
        y = y != 0
    return y


class _Prepared(NamedTuple):
    """Sorted scores of one class; the regions are filled in for AUPRO only."""

    ops: _Ops
    neg: Array  # scores of negatives (normal images / normal pixels), ascending
    pos: Array  # scores of positives, ascending
    pos_group: Array | None  # per positive: index of its region's size in group_size
    group_size: Array | None  # distinct region sizes (int64)
    n_regions: int

    @property
    def n_neg(self) -> int:
        return int(self.neg.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.pos.shape[0])


# 8-connectivity inside each image, none across images: one scipy call labels a whole class
# and the labels come out unique across images.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


def _prepare(y_true: Array, y_score: Array, regions: bool = False) -> _Prepared:
    y_true, y_score = (x if isinstance(x, torch.Tensor) else np.asarray(x) for x in (y_true, y_score))
    ops: _Ops = _TorchOps if _on_gpu(y_score) else _NumpyOps
    if tuple(y_true.shape) != tuple(y_score.shape):
        raise ValueError(f"shape mismatch: labels {tuple(y_true.shape)} vs scores {tuple(y_score.shape)}")
    if regions and len(y_score.shape) != 3:
        raise ValueError(f"masks and maps must have shape (M, H, W), got {tuple(y_score.shape)}")
    s = _scores(y_score, ops)
    y = _labels(y_true, ops, like=s)
    neg = ops.sort(s[~y])
    pos = s[y]
    if not regions:
        return _Prepared(ops, neg, ops.sort(pos), None, None, 0)

    # Connected components need scipy, i.e. the CPU; only the region sizes of positives
    # travel back to the scores' device.
    mask = (y.cpu().numpy() if ops is _TorchOps else y).reshape(y_score.shape)
    labels, n_regions = ndimage.label(mask, structure=_STRUCTURE_8)
    region = labels[mask].astype(np.int64) - 1
    del labels
    size = np.bincount(region, minlength=n_regions)
    # Regions are grouped by size: the 200-threshold overlaps are then exact integer counts
    # per (size, threshold), a table that stays small (distinct sizes are few).
    group_size, region_group = np.unique(size, return_inverse=True)
    pos, pos_group = ops.sort_with(pos, ops.put(region_group.reshape(-1)[region], like=pos))
    return _Prepared(ops, neg, pos, pos_group, ops.put(group_size.astype(np.int64), like=pos), n_regions)


def _count(ops: _Ops, a: Array, v: Any, right: bool = False) -> int:
    """Number of elements of the sorted ``a`` below ``v`` (``<= v`` if ``right``)."""
    return int(ops.searchsorted(a, v.reshape(1), right=right)[0])


def _binary_defined(p: _Prepared, metric: str) -> bool:
    if p.n_pos == 0 or p.n_neg == 0:
        _undefined(metric, "only one label present")
        return False
    return True


# --------------------------------------------------------------------------- AUROC, AP, F1


def _auroc(p: _Prepared) -> float:
    if not _binary_defined(p, "auroc"):
        return math.nan
    # Mann-Whitney with ties counted half: equals the trapezoidal ROC area (sklearn).
    below = p.ops.searchsorted(p.neg, p.pos)
    below_or_tied = p.ops.searchsorted(p.neg, p.pos, right=True)
    twice_u = int((below + below_or_tied).sum())
    return twice_u / (2 * p.n_pos * p.n_neg)


def _tp_fp_at_positives(p: _Prepared) -> tuple[Array, Array]:
    """TP and FP when predicting ``score >= s`` for each positive's score s."""
    tp = p.n_pos - p.ops.searchsorted(p.pos, p.pos)
    fp = p.n_neg - p.ops.searchsorted(p.neg, p.pos)
    return tp, fp


def _average_precision(p: _Prepared) -> float:
    if not _binary_defined(p, "ap"):
        return math.nan
    # Step-wise AP: sum over thresholds of recall gain x precision. Each positive carries a
    # recall gain of 1/P and sits at its own threshold, so tie groups come out right.
    tp, fp = _tp_fp_at_positives(p)
    precision = p.ops.f64(tp) / p.ops.f64(tp + fp)
    return float(precision.sum()) / p.n_pos


def _f1_max(p: _Prepared) -> F1Max:
    if not _binary_defined(p, "f1_max"):
        return F1Max(math.nan, math.nan)
    # Lowering the threshold past a negative only lowers F1, so the best threshold is one
    # of the positives' scores; F1 = 2TP / (TP + FP + P).
    tp, fp = _tp_fp_at_positives(p)
    f1 = p.ops.f64(2 * tp) / p.ops.f64(tp + fp + p.n_pos)
    best = p.ops.argmax(f1)
    return F1Max(float(f1[best]), float(p.pos[best]))


def auroc(y_true: Array, y_score: Array) -> float:
    """Area under the ROC curve (exact, ties as groups); equals ``sklearn.metrics.roc_auc_score``."""
    return _auroc(_prepare(y_true, y_score))


def average_precision(y_true: Array, y_score: Array) -> float:
    """Step-wise average precision; equals ``sklearn.metrics.average_precision_score``."""
    return _average_precision(_prepare(y_true, y_score))


def f1_max(y_true: Array, y_score: Array) -> F1Max:
    """Maximum F1 over all distinct thresholds, and the (lowest) threshold reaching it."""
    return _f1_max(_prepare(y_true, y_score))


# --------------------------------------------------------------------------- AUPRO


def _aupro_defined(p: _Prepared, metric: str) -> bool:
    if p.n_regions == 0:
        _undefined(metric, "no anomalous region")
        return False
    if p.n_neg == 0:
        _undefined(metric, "no normal pixel")
        return False
    return True


def _region_weights(p: _Prepared) -> Array:
    """1 / |region| for each positive (float64). Used in plain sums: a weighted bincount
    would be non-deterministic on CUDA (and refused under deterministic algorithms)."""
    return 1.0 / p.ops.f64(p.group_size)[p.pos_group]


def _aupro_exact(p: _Prepared, fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if not _aupro_defined(p, "aupro"):
        return math.nan
    ops, n, k_regions = p.ops, p.n_neg, p.n_regions
    # The curve first reaches the limit at the end of the tie group of the k-th largest
    # normal score, k the smallest count with k / n >= limit (float division, as the curve).
    k = max(1, math.ceil(fpr_limit * n))
    while k > 1 and (k - 1) / n >= fpr_limit:
        k -= 1
    while k / n < fpr_limit:
        k += 1
    cut = p.neg[n - k]
    n_at_or_below = _count(ops, p.neg, cut, right=True)
    n_below = _count(ops, p.neg, cut)
    x0, x1 = (n - n_at_or_below) / n, (n - n_below) / n  # FPR just above / at the cut

    # Full trapezoids: a normal pixel above the cut scoring s adds width 1/n and mean height
    # (PRO(>s) + PRO(>=s)) / 2. Summed per positive instead: a positive scoring t counts
    # once in PRO(>=s) for each normal s in (cut, t], and once in PRO(>s) for s in (cut, t).
    under_or_tied = ops.clamp0(ops.searchsorted(p.neg, p.pos, right=True) - n_at_or_below)
    under = ops.clamp0(ops.searchsorted(p.neg, p.pos) - n_at_or_below)
    weight = _region_weights(p)
    area = float((weight * ops.f64(under_or_tied + under)).sum()) / (2 * n * k_regions)

    # The segment across the limit: PRO above and at the cut, interpolated at the limit.
    y0 = float(weight[_count(ops, p.pos, cut, right=True) :].sum()) / k_regions
    y1 = float(weight[_count(ops, p.pos, cut) :].sum()) / k_regions
    y_limit = y1 if x1 == fpr_limit else y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    area += (fpr_limit - x0) * (y0 + y_limit) / 2
    return min(area / fpr_limit, 1.0)  # PRO <= 1; the min only absorbs float rounding


def _aupro_200(p: _Prepared, variant: str) -> float:
    metric = f"aupro ({variant})"
    if not _aupro_defined(p, metric):
        return math.nan
    ops = p.ops
    lo = min(ops.numpy(p.neg[0]), ops.numpy(p.pos[0]))
    hi = max(ops.numpy(p.neg[-1]), ops.numpy(p.pos[-1]))
    if lo == hi:
        return _undefined(metric, "constant anomaly maps")
    # cflow-ad's expression, evaluated by numpy on scalars of the maps' dtype: the same
    # thresholds (values, dtype and their count, 200 or 201) as the papers' code.
    thresholds = np.arange(lo, hi, (hi - lo) / 200)
    n_th = len(thresholds)
    th = ops.put(thresholds, like=p.pos)

    # Binarisation is `score > th`. FP per threshold: normal pixels above it.
    fp = p.n_neg - ops.numpy(ops.searchsorted(p.neg, th, right=True)).astype(np.int64)
    fpr = fp / p.n_neg
    # Per positive: how many thresholds it exceeds (it is "on" for thresholds 0..c-1).
    exceeded = ops.searchsorted(th, p.pos)
    hist = ops.numpy(ops.bincount(p.pos_group * (n_th + 1) + exceeded, minlength=len(p.group_size) * (n_th + 1)))
    hist = hist.reshape(-1, n_th + 1).astype(np.int64)
    # overlap[g, i]: pixels of the size-g regions that exceed threshold i (exact integers).
    overlap = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    pro = (overlap / ops.numpy(p.group_size)[:, None].astype(np.float64)).sum(axis=0) / p.n_regions

    keep = fpr < 0.3
    if keep.sum() < 2:
        return _undefined(metric, "fewer than 2 thresholds with FPR < 0.3")
    x, y = fpr[keep], pro[keep]
    if variant == "compat200":
        if x.max() == x.min():
            return _undefined(metric, "constant FPR below 0.3")
        x = (x - x.min()) / (x.max() - x.min())
    else:
        if x.max() == 0:
            return _undefined(metric, "FPR is 0 at every kept threshold")
        x = x / x.max()
    # sklearn.metrics.auc: trapezoid, sign flipped for the decreasing x these curves have.
    dx = np.diff(x)
    direction = -1.0 if np.any(dx < 0) else 1.0
    return direction * float(np.sum(dx * (y[1:] + y[:-1]) / 2.0))


def aupro(masks: Array, maps: Array, fpr_limit: float = 0.3) -> float:
    """Exact MVTec AD AU-PRO up to ``fpr_limit``, normalised by it.

    8-connected regions per image, PRO = mean per-region overlap, FPR over all normal pixels
    of all images, every distinct score a threshold, linear interpolation at the limit.
    ``masks``: (M, H, W) binary; ``maps``: (M, H, W) float.
    """
    return _aupro_exact(_prepare(masks, maps, regions=True), fpr_limit)


def aupro_compat200(masks: Array, maps: Array) -> float:
    """AUPRO as cflow-ad's ``cal_pro_score`` (AnomalyCLIP, Crane, ViP²-CLIP tables).

    200 thresholds ``np.arange(min, max, (max - min) / 200)``, ``score > th``, FPR < 0.3
    kept and min-max rescaled, trapezoid. Same numbers, one labelling pass.
    """
    return _aupro_200(_prepare(masks, maps, regions=True), "compat200")


def aupro_bsr200(masks: Array, maps: Array) -> float:
    """AUPRO as BSR-CLIP's ``compute_pro``: like ``aupro_compat200`` but FPR / max(FPR)."""
    return _aupro_200(_prepare(masks, maps, regions=True), "bsr200")


AUPRO_VARIANTS: dict[str, Callable[[Array, Array], float]] = {
    "exact": aupro,
    "compat200": aupro_compat200,
    "bsr200": aupro_bsr200,
}

_AUPRO_FROM_PREPARED: dict[str, Callable[[_Prepared], float]] = {
    "exact": lambda p: _aupro_exact(p, 0.3),
    "compat200": lambda p: _aupro_200(p, "compat200"),
    "bsr200": lambda p: _aupro_200(p, "bsr200"),
}


# --------------------------------------------------------------------------- per class


def image_metrics(labels: Array, scores: Array) -> dict[str, float]:
    """Image-level ``auroc``, ``ap``, ``f1_max`` and ``f1_threshold`` of one class."""
    p = _prepare(labels, scores)
    f1 = _f1_max(p)
    return {"auroc": _auroc(p), "ap": _average_precision(p), "f1_max": f1.value, "f1_threshold": f1.threshold}


def pixel_metrics(masks: Array, maps: Array, aupro_variant: str = "exact") -> dict[str, float | str]:
    """Pixel-level ``auroc``, ``ap``, ``f1_max``, ``f1_threshold`` and ``aupro`` of one class.

    All pixels of all (M, H, W) maps are pooled; ``aupro_variant`` is a key of
    ``AUPRO_VARIANTS`` and is returned under ``aupro_variant``.
    """
    if aupro_variant not in _AUPRO_FROM_PREPARED:
        raise ValueError(f"unknown AUPRO variant {aupro_variant!r}; choose from {sorted(AUPRO_VARIANTS)}")
    p = _prepare(masks, maps, regions=True)
    f1 = _f1_max(p)
    return {
        "auroc": _auroc(p),
        "ap": _average_precision(p),
        "f1_max": f1.value,
        "f1_threshold": f1.threshold,
        "aupro": _AUPRO_FROM_PREPARED[aupro_variant](p),
        "aupro_variant": aupro_variant,
    }


# Per-class decision values: meaningless as a mean over classes.
_NOT_AVERAGED = frozenset({"f1_threshold"})


def class_mean(per_class: Mapping[str, Mapping[str, float | str]]) -> dict[str, Any]:
    """Unweighted mean over classes, as the papers report it.

    Numeric metric -> ``{"mean": float, "n_classes": classes averaged, "n_total": classes
    reporting it}``; NaN values are left out (the mean is NaN, with a warning, if none is
    left). String fields such as ``aupro_variant`` are copied and must agree across classes.
    ``f1_threshold`` is per class and is not averaged.
    """
    keys = list(dict.fromkeys(k for metrics in per_class.values() for k in metrics))
    result: dict[str, Any] = {}
    for key in keys:
        if key in _NOT_AVERAGED:
            continue
        values = [metrics[key] for metrics in per_class.values() if key in metrics]
        if all(isinstance(v, str) for v in values):
            if len(set(values)) > 1:
                raise ValueError(f"classes disagree on {key}: {sorted(set(values))}")
            result[key] = values[0]
            continue
        defined = [float(v) for v in values if not math.isnan(float(v))]
        mean = sum(defined) / len(defined) if defined else _undefined(f"mean {key}", "no class defines it")
        result[key] = {"mean": mean, "n_classes": len(defined), "n_total": len(values)}
    return result


# --------------------------------------------------------------------------- at one threshold
# A calibrated decision is ``score >= threshold``; these read a confusion matrix at that one
# threshold (O(n), no sort). A rate whose denominator is empty is NaN with a warning.


class Confusion(NamedTuple):
    tp: int
    fp: int
    tn: int
    fn: int


def confusion_at(y_true: Array, y_score: Array, threshold: float) -> Confusion:
    """Counts when predicting positive for ``score >= threshold`` (any shape, flattened; one
    comparison per element, so GPU tensors are counted on the CPU)."""
    y_true, y_score = (x.detach().cpu() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (y_true, y_score))
    if tuple(y_true.shape) != tuple(y_score.shape):
        raise ValueError(f"shape mismatch: labels {tuple(y_true.shape)} vs scores {tuple(y_score.shape)}")
    s = _scores(y_score, _NumpyOps)
    y = _labels(y_true, _NumpyOps, like=s)
    predicted = s >= threshold
    tp = int(np.count_nonzero(predicted & y))
    fp = int(np.count_nonzero(predicted)) - tp
    positives = int(np.count_nonzero(y))
    return Confusion(tp, fp, int(s.size) - positives - fp, positives - tp)


def _ratio(numerator: int, denominator: int, metric: str, reason: str) -> float:
    return numerator / denominator if denominator else _undefined(metric, reason)


def rates_at_threshold(y_true: Array, y_score: Array, threshold: float) -> dict[str, float]:
    """``fpr`` (normal flagged / normal) and ``tpr`` (anomalous flagged / anomalous) at ``threshold``."""
    c = confusion_at(y_true, y_score, threshold)
    return {"fpr": _ratio(c.fp, c.fp + c.tn, "fpr", "no negatives"),
            "tpr": _ratio(c.tp, c.tp + c.fn, "tpr", "no positives")}


def image_decision_metrics(labels: Array, scores: Array, threshold: float) -> dict[str, float]:
    """Image-level ``accuracy``, ``precision``, ``recall`` and ``fpr`` of ``score >= threshold``."""
    c = confusion_at(labels, scores, threshold)
    return {"accuracy": _ratio(c.tp + c.tn, sum(c), "accuracy", "no images"),
            "precision": _ratio(c.tp, c.tp + c.fp, "precision", "nothing predicted anomalous"),
            "recall": _ratio(c.tp, c.tp + c.fn, "recall", "no positives"),
            "fpr": _ratio(c.fp, c.fp + c.tn, "fpr", "no negatives")}


def pixel_decision_metrics(masks: Array, maps: Array, threshold: float) -> dict[str, float]:
    """Pixel ``precision``, ``recall`` and ``iou`` of the binary masks ``map >= threshold``, all
    pixels of one class pooled (IoU = TP / (TP + FP + FN))."""
    c = confusion_at(masks, maps, threshold)
    return {"precision": _ratio(c.tp, c.tp + c.fp, "pixel precision", "no pixel predicted anomalous"),
            "recall": _ratio(c.tp, c.tp + c.fn, "pixel recall", "no anomalous pixels"),
            "iou": _ratio(c.tp, c.tp + c.fp + c.fn, "iou", "no anomalous pixel predicted or true")}
