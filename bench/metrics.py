"""Benchmark of the AUPRO implementations in zsadcli.core.metrics.

On a fixed synthetic class (N maps of SxS, random blob regions, some all-normal images, smooth
maps correlated with the masks) it times:

- ours: ``aupro`` (exact), ``aupro_compat200``, ``aupro_bsr200``, ``pixel_metrics``;
- the reference 200-threshold loop, as the papers' code does it (cflow-ad ``cal_pro_score``:
  per threshold, binarise all maps and label every ground truth again, regionprops-style);
- a plain exact AUPRO (argsort of all pixels, cumulative sums; the MVTec recipe);
- anomalib's AUPRO, if installed.

and prints a table with the agreement between them. Usage: ``python bench/metrics.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's zsadcli

from zsadcli.core import metrics  # noqa: E402

FPR_LIMIT = 0.3


def make_workload(n_images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary masks (bool) and float32 maps of shape (n_images, size, size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    masks = np.zeros((n_images, size, size), dtype=bool)
    maps = np.empty((n_images, size, size), dtype=np.float32)
    sigma = size / 128
    for i in range(n_images):
        if rng.random() < 0.6:  # the rest stay all-normal
            for _ in range(rng.integers(1, 5)):
                cy, cx = rng.uniform(0, size, 2)
                ry, rx = rng.uniform(1, size / 8, 2)
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            if rng.random() < 0.3:
                masks[i, rng.integers(size), rng.integers(size)] = True  # single-pixel region
        signal = masks[i] * rng.uniform(1.0, 4.0)
        if rng.random() < 0.3:  # a false-positive hot spot on normal pixels
            cy, cx = rng.uniform(0, size, 2)
            hot = ((yy - cy) ** 2 + (xx - cx) ** 2 <= (size / 20) ** 2) & ~masks[i]
            signal = signal + hot * rng.uniform(1.0, 5.0)
        noise = ndimage.gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), sigma)
        maps[i] = noise / noise.std() + ndimage.gaussian_filter(signal.astype(np.float32), sigma)
    return masks, maps


def reference_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and PRO at the 200 thresholds, the way cflow-ad's cal_pro_score computes them."""
    structure = np.ones((3, 3))
    lo, hi = maps.min(), maps.max()
    normal = ~masks
    n_normal = normal.sum()
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / 200):
        binary = maps > th
        pro = []
        for binary_map, mask in zip(binary, masks):
            labeled, _ = ndimage.label(mask, structure=structure)
            for r, box in enumerate(ndimage.find_objects(labeled), start=1):  # regionprops
                region = labeled[box] == r
                pro.append(binary_map[box][region].sum() / region.sum())
        fprs.append(np.logical_and(normal, binary).sum() / n_normal)
        pros.append(np.array(pro).mean())
    return np.array(fprs), np.array(pros)


def reference_area(fprs: np.ndarray, pros: np.ndarray, variant: str) -> float:
    keep = fprs < FPR_LIMIT
    x = fprs[keep]
    x = (x - x.min()) / (x.max() - x.min()) if variant == "compat200" else x / x.max()
    return auc(x, pros[keep])


def plain_exact_aupro(masks: np.ndarray, maps: np.ndarray) -> float:
    """MVTec AU-PRO the direct way: sort every pixel, cumulate FP counts and PRO weights."""
    labels, n_regions = ndimage.label(masks, structure=np.pad(np.ones((1, 3, 3)), ((1, 1), (0, 0), (0, 0))))
    labels = labels.ravel()
    w_pro = np.zeros(labels.shape, dtype=np.float64)
    in_region = labels > 0
    w_pro[in_region] = 1.0 / np.bincount(labels)[labels[in_region]]
    w_fp = (labels == 0).astype(np.int64)
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr = np.cumsum(w_fp[order]) / w_fp.sum()
    pro = np.cumsum(w_pro[order]) / n_regions
    last = np.append(scores[1:] != scores[:-1], True)  # last index of each run of equal scores
    fpr = np.concatenate([[0.0], fpr[last]])
    pro = np.concatenate([[0.0], np.minimum(pro[last], 1.0)])
    i = np.searchsorted(fpr, FPR_LIMIT, side="right")  # first point beyond the limit
    area = np.sum((fpr[1:i] - fpr[: i - 1]) * (pro[1:i] + pro[: i - 1]) / 2)
    if fpr[i - 1] < FPR_LIMIT:
        pro_cut = pro[i - 1] + (pro[i] - pro[i - 1]) * (FPR_LIMIT - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        area += (FPR_LIMIT - fpr[i - 1]) * (pro[i - 1] + pro_cut) / 2
    return float(area / FPR_LIMIT)


def timed(fn: Callable[[], object], repeats: int, sync: bool = False) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, value


def anomalib_aupro(masks: np.ndarray, maps: np.ndarray) -> Callable[[], float] | str:
    """A callable computing anomalib's AUPRO, or the reason it cannot run."""
    try:
        from anomalib.metrics import AUPRO
    except ImportError:
        return "not installed"

    def run() -> float:
        metric = AUPRO(fpr_limit=FPR_LIMIT)
        metric.update(torch.from_numpy(maps), torch.from_numpy(masks).int())
        return float(metric.compute())

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=100)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (ours)")
    args = parser.parse_args()
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"

    masks, maps = make_workload(args.n_images, args.size, args.seed)
    n_regions = ndimage.label(masks, structure=np.pad(np.ones((1, 3, 3)), ((1, 1), (0, 0), (0, 0))))[1]
    lo, hi = maps.min(), maps.max()
    print(
        f"workload: {args.n_images} maps of {args.size}x{args.size} float32 ({maps.size / 1e6:.1f} M pixels), "
        f"{int(masks.any(axis=(1, 2)).sum())} anomalous images, {n_regions} regions, "
        f"{masks.mean() * 100:.2f}% anomalous pixels, {len(np.arange(lo, hi, (hi - lo) / 200))} thresholds "
        f"for the 200-threshold variants; torch threads {torch.get_num_threads()}, device {device}"
    )

    rows: list[tuple[str, float, float, float | None]] = []  # name, seconds, value, |diff|
    t_ref, (fprs, pros) = timed(lambda: reference_pro_curve(masks, maps), 1)
    ref = {v: reference_area(fprs, pros, v) for v in ("compat200", "bsr200")}
    rows.append(("reference 200-threshold loop (compat200)", t_ref, ref["compat200"], None))
    rows.append(("reference 200-threshold loop (bsr200)", t_ref, ref["bsr200"], None))
    t_plain, plain = timed(lambda: plain_exact_aupro(masks, maps), 1)
    rows.append(("plain exact (argsort + cumsum)", t_plain, plain, None))

    inputs = [("cpu", masks, maps)]
    if device == "cuda":
        inputs.append(("cuda", torch.from_numpy(masks).cuda(), torch.from_numpy(maps).cuda()))
    for where, m, s in inputs:
        sync = where == "cuda"
        for name, fn, expected in (
            ("aupro (exact)", metrics.aupro, plain),
            ("aupro_compat200", metrics.aupro_compat200, ref["compat200"]),
            ("aupro_bsr200", metrics.aupro_bsr200, ref["bsr200"]),
        ):
            fn(m, s)  # warm-up (CUDA context, allocator)
            t, value = timed(lambda: fn(m, s), args.repeats, sync)
            rows.append((f"ours {name} [{where}]", t, value, abs(value - expected)))
        t, pm = timed(lambda: metrics.pixel_metrics(m, s), args.repeats, sync)
        rows.append((f"ours pixel_metrics, all 5 metrics [{where}]", t, pm["aupro"], abs(pm["aupro"] - plain)))

    run_anomalib = anomalib_aupro(masks, maps)
    if isinstance(run_anomalib, str):
        print(f"anomalib AUPRO: skipped ({run_anomalib})")
    else:
        t, value = timed(run_anomalib, 1)
        rows.append(("anomalib AUPRO", t, value, abs(value - plain)))

    print(f"\n{'implementation':48s} {'seconds':>9s} {'speed-up':>9s} {'value':>18s} {'|diff|':>9s}")
    print("-" * 97)
    for name, t, value, diff in rows:
        diff_text = "-" if diff is None else f"{diff:.1e}"
        print(f"{name:48s} {t:9.3f} {t_ref / t:8.1f}x {value:18.15f} {diff_text:>9s}")
    print(
        "speed-up: vs the reference 200-threshold loop. |diff|: exact rows vs the plain exact, "
        "200-threshold rows vs the reference loop of the same variant."
    )
    print(f"exact - compat200 on this workload: {plain - ref['compat200']:+.4f} (exact {plain:.4f}, compat200 {ref['compat200']:.4f})")

    # Pixel AUROC/AP against sklearn at full scale (ours come from pixel_metrics above).
    t_auroc, sk_auroc = timed(lambda: roc_auc_score(masks.ravel(), maps.ravel()), 1)
    t_ap, sk_ap = timed(lambda: average_precision_score(masks.ravel(), maps.ravel()), 1)
    print(
        f"pixel AUROC: ours {pm['auroc']:.15f} sklearn {sk_auroc:.15f} |diff| {abs(pm['auroc'] - sk_auroc):.1e} "
        f"(sklearn {t_auroc:.1f} s); pixel AP: ours {pm['ap']:.15f} sklearn {sk_ap:.15f} "
        f"|diff| {abs(pm['ap'] - sk_ap):.1e} (sklearn {t_ap:.1f} s)"
    )


if __name__ == "__main__":
    main()
