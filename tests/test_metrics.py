import math
import warnings

import numpy as np
import pytest
import torch
from reference_metrics import ref_aupro_exact, ref_pro_200
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score

from zsadcli.core import metrics as M
from zsadcli.core.metrics import UndefinedMetric

# ----------------------------------------------------------------------------- data


def crafted_masks() -> np.ndarray:
    """6 images of 24x24 covering the awkward region shapes."""
    m = np.zeros((6, 24, 24), dtype=bool)
    m[0, 10, 10] = True  # single pixel
    m[0, 0:4, 0:3] = True  # touches two borders
    m[1, 5:8, 5:8] = True  # two blocks touching at one corner: one region with 8-connectivity
    m[1, 8:11, 8:11] = True
    for i in range(6):
        m[1, 15 + i, 2 + i] = True  # diagonal line: one region with 8-connectivity, 6 with 4
    # images 2 and 4 are all normal
    m[3, 1:, :] = True  # huge region with a hole
    m[3, 10:13, 10:13] = False
    m[5, 23, 23] = True  # corner pixel
    m[5, 20:24, 0:2] = True
    m[5, 3:6, 18:24] = True
    m[5, 12, 12] = True
    m[5, 12, 14] = True  # two columns apart: a separate region
    return m


def blob_masks(rng: np.random.Generator, n: int = 6, size: int = 24) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2, 2))
    masks = noise > np.quantile(noise, 0.85)
    masks[rng.random(n) < 0.3] = False  # some all-normal images
    return masks


def maps_for(masks: np.ndarray, rng: np.random.Generator, ties: str) -> np.ndarray:
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    if ties == "round":
        maps = np.round(maps, 1)  # heavy ties within and across labels
    elif ties == "levels":
        maps = np.floor(maps * 2)  # a handful of levels
    elif ties == "float32":
        maps = maps.astype(np.float32)
    return maps


TIES = ["none", "float32", "round", "levels"]

# ----------------------------------------------------------------------------- image level / sklearn


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", TIES)
def test_binary_metrics_match_sklearn(seed: int, ties: str) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(3000) < rng.uniform(0.05, 0.6)
    s = maps_for(y, rng, ties)
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)

    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    value, threshold = M.f1_max(y, s)
    assert value == pytest.approx(np.nanmax(f1), abs=1e-12)
    assert f1_score(y, s >= threshold) == pytest.approx(value, abs=1e-12)
    assert not (f1_score(y, s >= np.nextafter(threshold, -np.inf)) > value + 1e-12)


def test_pixel_level_binary_metrics_pool_all_pixels() -> None:
    rng = np.random.default_rng(7)
    masks = blob_masks(rng)
    maps = maps_for(masks, rng, "round")
    out = M.pixel_metrics(masks, maps)
    assert out["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert out["ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert out["f1_max"] == M.f1_max(masks, maps).value
    assert out["aupro"] == M.aupro(masks, maps)
    assert out["aupro_variant"] == "exact"


def test_image_metrics_keys_and_inputs() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    out = M.image_metrics(y, s)
    assert set(out) == {"auroc", "ap", "f1_max", "f1_threshold"}
    assert out["auroc"] == pytest.approx(roc_auc_score(y, s))
    # torch tensors (bf16 scores included) give the same numbers as numpy arrays
    assert M.image_metrics(torch.tensor(y), torch.tensor(s)) == out
    assert M.image_metrics(y.tolist(), s.tolist()) == out
    bf16 = torch.tensor(s).bfloat16()
    assert M.auroc(y, bf16) == pytest.approx(roc_auc_score(y, bf16.float().numpy()), abs=1e-12)


# ----------------------------------------------------------------------------- AUPRO


def aupro_cases():
    masks = crafted_masks()
    for seed, ties in enumerate(TIES):
        yield f"crafted-{ties}", masks, maps_for(masks, np.random.default_rng(seed), ties)
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        masks = blob_masks(rng)
        yield f"blobs{seed}-{TIES[seed + 1]}", masks, maps_for(masks, rng, TIES[seed + 1])


CASES = list(aupro_cases())
CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,masks,maps", CASES, ids=CASE_IDS)
def test_aupro_exact_matches_reference(name: str, masks: np.ndarray, maps: np.ndarray) -> None:
    for limit in (0.3, 0.05, 1.0):
        assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(ref_aupro_exact(masks, maps, limit), abs=1e-12)


def test_aupro_exact_curve_point_on_the_limit() -> None:
    # 10 normal pixels with distinct scores: FPR hits 0.3 exactly after the third; a tie
    # between a normal and an anomalous pixel sits on the cut.
    masks = np.zeros((1, 2, 10), dtype=bool)
    masks[0, 0] = True
    maps = np.zeros((1, 2, 10))
    maps[0, 0] = [9, 8.5, 8, 7, 6, 5, 4, 3, 2, 1]
    maps[0, 1] = [8.5, 7.5, 7, 6.5, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    assert M.aupro(masks, maps) == pytest.approx(ref_aupro_exact(masks, maps), abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # One region joined only diagonally. With 4-connectivity its halves would count as two
    # regions and AUPRO would change.
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = masks[0, 3:6, 3:6] = True
    maps = np.zeros((1, 8, 8))
    maps[0, 1:3, 1:3] = 1.0  # the small half is found first
    value = M.aupro(masks, maps)
    assert value == pytest.approx(ref_aupro_exact(masks, maps), abs=1e-12)
    # one region of 13 pixels, 4 found: PRO 4/13 at FPR 0, rises linearly to 1 at FPR 1
    assert value == pytest.approx(4 / 13 + (1 - 4 / 13) * 0.15, abs=1e-12)


@pytest.mark.parametrize("name,masks,maps", CASES, ids=CASE_IDS)
def test_aupro_200_variants_match_papers_code(name: str, masks: np.ndarray, maps: np.ndarray) -> None:
    assert abs(M.aupro_compat200(masks, maps) - ref_pro_200(masks, maps, "minmax")) <= 1e-9
    assert abs(M.aupro_bsr200(masks, maps) - ref_pro_200(masks, maps, "max")) <= 1e-9


def test_aupro_200_scores_equal_to_thresholds() -> None:
    # Integer scores 0..8: thresholds i * 0.04 hit the scores 1..7 exactly, so the strict
    # `score > th` of the papers' code matters.
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, n=8)
    maps = np.clip(np.floor(rng.normal(size=masks.shape) * 1.5 + 3 + 2 * masks), 0, 8)
    maps[0, 0, 0], maps[0, 0, 1] = 0, 8
    assert np.isin(np.arange(1.0, 8.0), np.arange(0.0, 8.0, 8.0 / 200)).all()
    assert abs(M.aupro_compat200(masks, maps) - ref_pro_200(masks, maps, "minmax")) <= 1e-9
    assert abs(M.aupro_bsr200(masks, maps) - ref_pro_200(masks, maps, "max")) <= 1e-9


def test_aupro_200_with_201_thresholds_and_an_outlier() -> None:
    rng = np.random.default_rng(3)
    masks = blob_masks(rng)
    maps = rng.random(masks.shape).astype(np.float32) * 0.1 + 0.4 + 0.05 * masks
    lo, hi = np.float32(0.3418692), np.float32(0.5460456)  # np.arange gives 201 values here
    assert len(np.arange(lo, hi, (hi - lo) / 200)) == 201
    maps = np.clip(maps, lo, hi)
    normal = np.argwhere(~masks)
    maps[tuple(normal[0])], maps[tuple(normal[-1])] = lo, hi  # a normal outlier sets the range
    values = {}
    for variant, rescale in (("compat200", "minmax"), ("bsr200", "max")):
        values[variant] = M.AUPRO_VARIANTS[variant](masks, maps)
        assert abs(values[variant] - ref_pro_200(masks, maps, rescale)) <= 1e-9
    assert values["compat200"] != values["bsr200"]  # the lowest kept FPR is not 0 here


# ----------------------------------------------------------------------------- undefined values


def test_single_label_is_nan_with_warning() -> None:
    with pytest.warns(UndefinedMetric):
        out = M.image_metrics(np.zeros(5), np.arange(5.0))
    assert all(math.isnan(v) for v in out.values())


@pytest.mark.parametrize("variant", sorted(M.AUPRO_VARIANTS))
@pytest.mark.parametrize("fill", [False, True])
def test_pixel_metrics_without_both_labels_are_nan(variant: str, fill: bool) -> None:
    masks = np.full((2, 8, 8), fill)
    maps = np.random.default_rng(0).random((2, 8, 8))
    with pytest.warns(UndefinedMetric):
        out = M.pixel_metrics(masks, maps, aupro_variant=variant)
    assert out["aupro_variant"] == variant
    assert all(math.isnan(out[k]) for k in ("auroc", "ap", "f1_max", "f1_threshold", "aupro"))


def test_aupro_200_degenerate_cases_are_nan() -> None:
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    with pytest.warns(UndefinedMetric, match="constant"):
        assert math.isnan(M.aupro_compat200(masks, np.ones((1, 4, 4))))
    maps = np.ones((1, 4, 4))
    maps[0, 0, 0] = 0.0  # every normal pixel above every threshold: no FPR < 0.3
    for fn in (M.aupro_compat200, M.aupro_bsr200):
        with pytest.warns(UndefinedMetric, match="fewer than 2"):
            assert math.isnan(fn(masks, maps))


def test_invalid_inputs_raise() -> None:
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match="binary"):
        M.aupro(maps, maps)
    with pytest.raises(ValueError, match="NaN"):
        M.auroc(np.array([0, 1]), np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="shape"):
        M.auroc(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="variant"):
        M.pixel_metrics(maps > 0.5, maps, aupro_variant="cflow")


# ----------------------------------------------------------------------------- aggregation


def test_class_mean_skips_nan_and_counts() -> None:
    per_class = {
        "a": {"auroc": 0.9, "aupro": math.nan, "f1_threshold": 0.2, "aupro_variant": "exact"},
        "b": {"auroc": 0.7, "aupro": 0.5, "f1_threshold": 0.7, "aupro_variant": "exact"},
        "c": {"auroc": 0.5, "aupro": 0.7, "f1_threshold": 0.1, "aupro_variant": "exact"},
    }
    out = M.class_mean(per_class)
    assert out["auroc"] == {"mean": pytest.approx(0.7), "n_classes": 3, "n_total": 3}
    assert out["aupro"] == {"mean": pytest.approx(0.6), "n_classes": 2, "n_total": 3}
    assert out["aupro_variant"] == "exact"
    assert "f1_threshold" not in out

    with pytest.warns(UndefinedMetric):
        assert math.isnan(M.class_mean({"a": {"ap": math.nan}})["ap"]["mean"])
    per_class["c"]["aupro_variant"] = "compat200"
    with pytest.raises(ValueError, match="disagree"):
        M.class_mean(per_class)


# ----------------------------------------------------------------------------- torch backend


def _all_metrics(masks, maps) -> dict:
    out = {v: M.pixel_metrics(masks, maps, aupro_variant=v) for v in M.AUPRO_VARIANTS}
    out["image"] = M.image_metrics(masks.reshape(len(masks), -1).any(1), maps.reshape(len(maps), -1).max(1))
    return out


def _assert_close(a: dict, b: dict) -> None:
    for key in a:
        for metric, value in a[key].items():
            if isinstance(value, str):
                assert value == b[key][metric]
            else:
                assert b[key][metric] == pytest.approx(value, abs=1e-12), (key, metric)


@pytest.mark.parametrize("ties", ["float32", "round"])
def test_torch_code_path_matches_numpy(monkeypatch: pytest.MonkeyPatch, ties: str) -> None:
    """The GPU code path (torch ops), run here on CPU tensors."""
    masks = crafted_masks()
    maps = maps_for(masks, np.random.default_rng(1), ties)
    expected = _all_metrics(masks, maps)
    monkeypatch.setattr(M, "_on_gpu", lambda x: isinstance(x, torch.Tensor))
    t_masks, t_maps = torch.from_numpy(masks), torch.from_numpy(maps)
    out = {v: M.pixel_metrics(t_masks, t_maps, aupro_variant=v) for v in M.AUPRO_VARIANTS}
    out["image"] = M.image_metrics(t_masks.flatten(1).any(1), t_maps.flatten(1).max(1).values)
    _assert_close(expected, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_numpy() -> None:
    masks = crafted_masks()
    maps = maps_for(masks, np.random.default_rng(1), "float32")
    expected = _all_metrics(masks, maps)
    t_masks, t_maps = torch.from_numpy(masks).cuda(), torch.from_numpy(maps).cuda()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # training runs may enable it; must not raise
    try:
        out = {v: M.pixel_metrics(t_masks, t_maps, aupro_variant=v) for v in M.AUPRO_VARIANTS}
        out["image"] = M.image_metrics(t_masks.flatten(1).any(1), t_maps.flatten(1).max(1).values)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    _assert_close(expected, out)


def test_warnings_not_raised_on_regular_data() -> None:
    masks = crafted_masks()
    maps = maps_for(masks, np.random.default_rng(0), "none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _all_metrics(masks, maps)
