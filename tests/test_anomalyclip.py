"""AnomalyCLIP on the tiny CLIP: parity with a plain re-statement of the official computation,
checkpoint formats, ablations, training and resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.tokenizer import tokenize

from reference_anomalyclip import anomalyclip_reference
from tinyclip import build_tiny_open_clip
from zsadcli.core.checkpoints import load_checkpoint, save_checkpoint
from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.data.images import clip_preprocess, open_image
from zsadcli.errors import BadInput


def authors_checkpoint(seed: int = 1, width: int = 64, perturb_buffers: bool = False) -> dict:
    """A checkpoint in zqhang/AnomalyCLIP's layout for the tiny CLIP (text width 64)."""
    clip = build_tiny_open_clip(seed=0)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for s, template in (("pos", "object."), ("neg", "damaged object.")):
        ids = tokenize([" ".join(["X"] * 12) + " " + template])
        emb = clip.token_embedding(ids).detach()
        state[f"ctx_{s}"] = 0.02 * torch.randn(1, 1, 12, width, generator=gen)
        state[f"token_prefix_{s}"] = emb[None, :, :1].clone()
        state[f"token_suffix_{s}"] = emb[None, :, 13:].clone()
        if perturb_buffers:
            state[f"token_suffix_{s}"] += 0.5 * torch.randn(state[f"token_suffix_{s}"].shape, generator=gen)
        state[f"tokenized_prompts_{s}"] = ids[None].int()
    for i in range(8):
        state[f"compound_prompts_text.{i}"] = 0.02 * torch.randn(4, width, generator=gen)
        state[f"compound_prompt_projections.{i}.weight"] = torch.randn(896, width, generator=gen)
        state[f"compound_prompt_projections.{i}.bias"] = torch.randn(896, generator=gen)
    return {"prompt_learner": state}


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory, tiny_registry):
    path = tmp_path_factory.mktemp("ckpt") / "epoch_15.pth"
    torch.save(authors_checkpoint(), path)
    return path


def build(checkpoint, size: int = 112, ablate=(), **kwargs):
    spec = MethodSpec("anomalyclip", backbone="tiny-clip", checkpoint=str(checkpoint), image_size=size,
                      ablate=frozenset(ablate), **kwargs)
    return build_method(spec).method


def batch_of(root, items, size):
    return torch.stack([clip_preprocess(open_image(root / it.img_path), size) for it in items])


def test_matches_the_official_computation(authors_file, synthetic_root):
    from zsadcli.data.meta import load_meta

    method = build(authors_file, size=112)
    items = load_meta(synthetic_root)["test"]["disc"][:3]
    images = batch_of(synthetic_root, items, 112)
    with torch.no_grad():
        out = method(images)
    clip = build_tiny_open_clip(seed=0)
    ref_scores, ref_maps = anomalyclip_reference(clip, authors_checkpoint()["prompt_learner"], images)
    assert out.anomaly_map.shape == (3, 112, 112)
    assert np.abs(out.anomaly_map.numpy() - ref_maps).max() <= 1e-4
    assert (out.image_score - ref_scores).abs().max() <= 1e-5


def test_checkpoint_buffers_define_the_prompts(tmp_path, synthetic_root, tiny_registry):
    """'Buffers win': stored token embeddings replace what our tokenizer would build."""
    path = tmp_path / "perturbed.pth"
    checkpoint = authors_checkpoint(perturb_buffers=True)
    torch.save(checkpoint, path)
    method = build(path, size=56)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = method(images)
    ref_scores, ref_maps = anomalyclip_reference(build_tiny_open_clip(seed=0), checkpoint["prompt_learner"], images)
    assert (out.image_score - ref_scores).abs().max() <= 1e-5
    assert np.abs(out.anomaly_map.numpy() - ref_maps).max() <= 1e-4


def test_our_format_round_trips_exactly(tmp_path, authors_file):
    method = build(authors_file, size=56)
    path = save_checkpoint(tmp_path / "ours.safetensors", method.checkpoint_state(), method="anomalyclip",
                           backbone="tiny-clip", trained_on="synthetic", hparams=method.hparams, epoch=3)
    loaded = load_checkpoint(path)
    assert loaded.kind == "zsad" and loaded.metadata["trained_on"] == "synthetic" and loaded.metadata["epoch"] == "3"
    again = build(path, size=56)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a, b = method(images), again(images)
    assert torch.equal(a.image_score, b.image_score) and torch.equal(a.anomaly_map, b.anomaly_map)


def test_static_text_features_are_computed_once(authors_file, monkeypatch):
    method = build(authors_file, size=56)
    calls = []
    original = method.backbone.encode_text_embeddings
    monkeypatch.setattr(method.backbone, "encode_text_embeddings", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        for _ in range(3):
            method(torch.randn(1, 3, 56, 56))
    assert len(calls) == 1


@pytest.mark.parametrize("switch", ["no-dpam", "no-deep-prompts", "all-layers", "no-smoothing"])
def test_ablation_switches_change_the_output(authors_file, switch):
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = build(authors_file, size=56)(images)
        other = build(authors_file, size=56, ablate=[switch])(images)
    assert not torch.allclose(base.anomaly_map, other.anomaly_map, atol=1e-6)
    if switch == "no-deep-prompts":  # text side: the image score moves too
        assert not torch.allclose(base.image_score, other.image_score, atol=1e-7)
    else:  # vision side: the global feature is the original path's CLS, untouched by these
        assert torch.allclose(base.image_score, other.image_score, atol=1e-6)


def test_unknown_ablation_and_wrong_width_are_bad_input(tmp_path, authors_file):
    with pytest.raises(BadInput, match="no ablation switch"):
        build(authors_file, ablate=["no-such-module"])
    wide = tmp_path / "wide.pth"
    checkpoint = authors_checkpoint(width=64)
    checkpoint["prompt_learner"]["ctx_pos"] = torch.zeros(1, 1, 12, 768)
    torch.save(checkpoint, wide)
    with pytest.raises(BadInput, match="shape"):
        build(wide)


def test_bf16_is_close_to_fp32(authors_file):
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = build(authors_file, size=56)(images)
        fast = build(authors_file, size=56, dtype=torch.bfloat16)(images)
    assert (exact.image_score - fast.image_score).abs().max() < 0.05
    assert (exact.anomaly_map - fast.anomaly_map).abs().max() < 0.05
