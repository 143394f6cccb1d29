"""WinCLIP on a tiny GELU ViT-B-16-plus-240-shaped CLIP: parity with a plain per-window
re-statement of anomalib's computation (zero- and few-shot), anomalib's preprocessing, the
vectorised windows and harmonic aggregation, caching, ablations and the predict contract."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from reference_winclip import winclip_reference
from zsadcli.cli import app
from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.core.methods.winclip import (TEMPLATES, covering_windows, harmonic_aggregation, prompt_ensemble,
                                          window_tokens)
from zsadcli.data.images import open_image


@pytest.fixture(scope="module")
def images(synthetic_root):
    from zsadcli.core.methods.winclip import WinCLIP

    paths = [synthetic_root / "disc/test/stain/000.png", synthetic_root / "checker/test/good/001.png"]
    method = WinCLIP.__new__(WinCLIP)  # preprocess only needs the input size
    method.hparams = {"image_size": 240}
    return torch.stack([WinCLIP.preprocess(method, open_image(p)) for p in paths])


def build(b16plus_file, ablate=(), class_name="bottle", **hparams):
    spec = MethodSpec("winclip", backbone_file=str(b16plus_file), image_size=240, hparams=hparams,
                      ablate=frozenset(ablate), class_name=class_name)
    return build_method(spec).method


def test_matches_anomalib_zero_shot(b16plus_file, clip, images):
    with torch.no_grad():
        out = build(b16plus_file)(images)
    scores, maps = winclip_reference(clip, images, "bottle")
    assert out.anomaly_map.shape == (2, 240, 240)
    assert (out.anomaly_map - maps).abs().max() <= 1e-4
    assert (out.image_score - scores).abs().max() <= 1e-5


def test_matches_anomalib_few_shot(b16plus_file, clip, images, synthetic_root, tmp_path):
    refs = [synthetic_root / "disc/train/good/000.png", synthetic_root / "disc/train/good/001.png"]
    for i, path in enumerate(refs):
        (tmp_path / f"{i}.png").write_bytes(path.read_bytes())
    method = build(b16plus_file, reference=str(tmp_path))
    query = images[:1]
    with torch.no_grad():
        out = method(query)
        ref_images = torch.stack([method.preprocess(open_image(p)) for p in refs])
    scores, maps = winclip_reference(clip, query, "bottle", reference_images=ref_images)
    assert (out.anomaly_map - maps).abs().max() <= 1e-4
    assert (out.image_score - scores).abs().max() <= 1e-5
    with torch.no_grad():
        assert not torch.allclose(build(b16plus_file)(query).anomaly_map, out.anomaly_map, atol=1e-4)
    # DIR/<class>/ is used when it exists (eval walks the classes of a dataset)
    (tmp_path / "bottle").mkdir()
    (tmp_path / "bottle" / "0.png").write_bytes(refs[0].read_bytes())
    assert [p.name for p in build(b16plus_file, reference=str(tmp_path)).reference_paths()] == ["0.png"]


def test_preprocess_is_anomalibs(b16plus_file, tmp_path):
    """RGB -> float x 1/255 -> antialiased bicubic resize of the float tensor -> Normalize."""
    from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize
    from torchvision.transforms.v2.functional import to_dtype, to_image

    rng = np.random.default_rng(0)
    files = {"rgb.png": Image.fromarray((rng.random((300, 280, 3)) * 255).astype(np.uint8)),
             "gray.png": Image.fromarray((rng.random((97, 130)) * 255).astype(np.uint8)),
             "native.png": Image.fromarray((rng.random((240, 240, 3)) * 255).astype(np.uint8))}
    transform = Compose([Resize((240, 240), antialias=True, interpolation=InterpolationMode.BICUBIC),
                         Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))])
    method = build(b16plus_file)
    for name, img in files.items():
        img.save(tmp_path / name)
        ours = method.preprocess(open_image(tmp_path / name))
        theirs = transform(to_dtype(to_image(Image.open(tmp_path / name).convert("RGB")), torch.float32, scale=True)[None])[0]
        assert ours.shape == (3, 240, 240)
        assert (ours - theirs).abs().max() <= 1e-5, name


def test_windows_and_harmonic_aggregation_match_the_loops():
    grid, kernel = 6, 3
    windows = window_tokens(grid, kernel)
    assert windows.shape == ((grid - kernel + 1) ** 2, kernel * kernel)
    # anomalib builds them with unfold over the index grid: column w = window w
    unfolded = torch.nn.functional.unfold(torch.arange(grid * grid).reshape(1, grid, grid).float(), kernel).int()
    assert torch.equal(windows, unfolded.T.long())
    index, counts = covering_windows(windows, grid * grid)
    scores = torch.rand(3, windows.shape[0], generator=torch.Generator().manual_seed(0)) + 0.05
    scores[0, 4] = 0.0  # a zero score: 1/0 = inf, the patch's harmonic mean is 0 (anomalib: posinf -> 0)
    ours = harmonic_aggregation(scores, index, counts, grid)
    expected = torch.zeros(3, grid * grid)
    for patch in range(grid * grid):
        member = torch.any(windows.T == patch, dim=0)
        expected[:, patch] = member.sum() / (1 / scores.T[member]).sum(dim=0)
    expected = expected.nan_to_num(posinf=0.0).reshape(3, grid, grid)
    assert torch.allclose(ours, expected, atol=1e-7)
    assert (ours[0].flatten()[windows[4]] == 0).all()


def test_window_chunks_do_not_change_the_result(b16plus_file, images):
    with torch.no_grad():
        batched = build(b16plus_file)(images[:1])
        chunked = build(b16plus_file, window_chunk=97)(images[:1])
    assert (batched.anomaly_map - chunked.anomaly_map).abs().max() <= 1e-6
    assert (batched.image_score - chunked.image_score).abs().max() <= 1e-6


def test_prompt_ensemble_keeps_anomalibs_duplicate():
    normal, anomalous = prompt_ensemble("bottle")
    assert len(TEMPLATES) == 21 and len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert normal.count("a jpeg corrupted photo of the bottle.") == 2
    assert normal[0] == "a cropped photo of the bottle." and anomalous[0] == "a cropped photo of the damaged bottle."
    deduped_normal, deduped_anomalous = prompt_ensemble("bottle", dedupe=True)
    assert len(deduped_normal) == 7 * 20 and len(deduped_anomalous) == 4 * 20


def test_text_features_are_cached_per_class(b16plus_file, monkeypatch):
    method = build(b16plus_file)
    calls = []
    original = method.backbone.encode_text
    monkeypatch.setattr(method.backbone, "encode_text", lambda ids: calls.append(len(ids)) or original(ids))
    images = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        first = method(images)
        method(images)
        assert calls == [147, 84]  # once: all normal prompts, then all anomalous prompts
        method.set_class_name("screw")
        other = method(images)
    assert len(calls) == 4
    assert not torch.allclose(first.image_score, other.image_score)


@pytest.mark.parametrize("switch", ["no-image-score", "no-small-windows", "no-large-windows"])
def test_ablation_switches_change_the_map(b16plus_file, switch):
    images = torch.randn(1, 3, 240, 240, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = build(b16plus_file)(images)
        other = build(b16plus_file, ablate=[switch])(images)
    assert not torch.allclose(base.anomaly_map, other.anomaly_map, atol=1e-6)
    assert torch.allclose(base.image_score, other.image_score)


def test_predict_contract(b16plus_file, synthetic_root, tmp_path):
    runner = CliRunner()
    image = synthetic_root / "disc/test/stain/000.png"
    raw = tmp_path / "raw"
    result = runner.invoke(app, ["predict", str(image), "--method", "winclip", "--backbone-file", str(b16plus_file),
                                 "--image-size", "240", "--device", "cpu", "--save-raw", str(raw), "--json",
                                 "--class-name", "object"])
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    saved = np.load(raw / "000.npy")
    assert saved.dtype == np.float32 and saved.shape == (240, 240)
    assert math.isclose(record["map_max"], float(saved.max()), rel_tol=1e-6) and 0 <= record["image_score"] <= 1
    method = build(b16plus_file, class_name="object")
    with torch.no_grad():
        out = method(method.preprocess(open_image(image))[None])
    np.testing.assert_array_equal(saved, out.anomaly_map[0].numpy())
    assert math.isclose(record["image_score"], float(out.image_score[0]), rel_tol=1e-7)
    # options of other methods are refused, not ignored
    refused = runner.invoke(app, ["predict", str(image), "--method", "winclip", "--backbone-file", str(b16plus_file),
                                  "--rep-vec", "dbscan"])
    assert refused.exit_code == 2


def test_bf16_is_close_to_fp32(b16plus_file, images):
    spec = MethodSpec("winclip", backbone_file=str(b16plus_file), image_size=240, dtype=torch.bfloat16)
    with torch.no_grad():
        exact = build(b16plus_file)(images[:1])
        fast = build_method(spec).method(images[:1])
    assert (exact.image_score - fast.image_score).abs().max() < 0.05
    assert (exact.anomaly_map - fast.anomaly_map).abs().max() < 0.05
