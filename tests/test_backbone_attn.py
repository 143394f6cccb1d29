"""ClipBackbone.forward_image(attn_probs=...): head-averaged attention probabilities of chosen
blocks, checked against nn.MultiheadAttention's own weights; the default path is unchanged."""
from __future__ import annotations

import pytest
import torch

from zsadcli.core.attention import DualPath
from zsadcli.core.backbone import load_backbone
from zsadcli.errors import BadInput


@pytest.fixture(scope="module")
def backbone(tiny_registry):
    return load_backbone("tiny-clip", quick_gelu=True)


def test_attention_probs_equal_multihead_attention_weights(backbone):
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        feats = backbone.forward_image(images, taps=(5, 8), attn_probs=(6, 8))
        assert set(feats.attn_probs) == {6, 8}
        blocks = backbone.visual.transformer.resblocks
        for index, before in ((6, feats.taps[5]), (8, None)):
            x = before if before is not None else blocks[6](blocks[5](feats.taps[5]))
            h = blocks[index - 1].ln_1(x)
            _, weights = blocks[index - 1].attn(h, h, h, need_weights=True, average_attn_weights=True)
            probs = feats.attn_probs[index]
            assert probs.shape == (2, 1 + 64, 1 + 64)
            torch.testing.assert_close(probs, weights, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(probs.sum(-1), torch.ones(2, 65))


def test_requesting_attention_changes_no_feature(backbone):
    images = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        plain = backbone.forward_image(images, taps=(6, 12, 24))
        with_attn = backbone.forward_image(images, taps=(6, 12, 24), attn_probs=(6, 7, 8, 9))
        dual = backbone.forward_image(images, taps=(12,), dual=DualPath(start=6), attn_probs=(7,))
        dual_plain = backbone.forward_image(images, taps=(12,), dual=DualPath(start=6))
    assert not plain.attn_probs
    for layer in (6, 12, 24):
        assert torch.equal(plain.taps[layer], with_attn.taps[layer])
    assert torch.equal(plain.tokens, with_attn.tokens)
    assert torch.equal(dual.alt_taps[12], dual_plain.alt_taps[12]) and set(dual.attn_probs) == {7}


def test_attention_of_a_missing_block_is_refused(backbone):
    with pytest.raises(BadInput, match="do not exist"):
        backbone.forward_image(torch.randn(1, 3, 56, 56), attn_probs=(25,))
