"""Alternate attention paths run beside frozen CLIP blocks ("dual path").

Several methods keep the original CLIP forward intact and, from some block on, also carry a
second residual stream whose attention is replaced:
- AnomalyCLIP's DPAM / CLIP-Surgery's v-v attention: softmax(V V^T * s) V, no MLP on that path;
- Crane's E-Attn (qq+kk+vv) and its variants are further `AltAttention`s on the same mechanism;
  CLIP-AD's staged surgery can be one too.
The alternate path always reads the *original* stream's LayerNorm output, reuses the block's
own qkv and output projections, and adds its attention to its own residual stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim)
AltAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def vv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """V-V self-attention (q = k = v), scaled by head_dim^-1/2 like the original path."""
    return F.scaled_dot_product_attention(v, v, v)


def _self_attention(x: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(x x^T * s) v (s = head_dim^-1/2 unless given)."""
    return F.scaled_dot_product_attention(x, x, v, scale=scale)


def eattn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Crane's E-Attn: (softmax(QQ^T s) + softmax(KK^T s) + softmax(VV^T s)) V.

    The three row-stochastic matrices are summed without renormalising (rows sum to 3), as the
    official code does; by linearity this is the sum of three attention outputs.
    """
    return _self_attention(v, v) + _self_attention(k, v) + _self_attention(q, v)


def qkv_concat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Crane's "(q+k+v)^2" variant: self-attention of [q, k, v] concatenated per head,
    scale head_dim^-1/2 * 3^-1/2."""
    joint = torch.cat([q, k, v], dim=-1)
    return _self_attention(joint, v, scale=q.shape[-1] ** -0.5 * 3 ** -0.5)


ALT_ATTENTIONS: dict[str, AltAttention] = {
    "vv": vv_attention,
    # Crane's E-Attn (default "qq+kk+vv") and the variants its code offers
    "qq+kk+vv": eattn_attention,
    "qq": lambda q, k, v: _self_attention(q, v),
    "kk": lambda q, k, v: _self_attention(k, v),
    "qq+kk": lambda q, k, v: _self_attention(k, v) + _self_attention(q, v),
    "(q+k+v)^2": qkv_concat_attention,
}


@dataclass(frozen=True)
class DualPath:
    """Run ``attention`` as a second path in every block from ``start`` (1-based) on."""

    start: int
    attention: str = "vv"

    def __post_init__(self) -> None:
        if self.attention not in ALT_ATTENTIONS:
            raise ValueError(f"unknown alternate attention {self.attention!r}")


def split_qkv(block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's fused in-projection, split into heads: 3 x (B, heads, N, head_dim)."""
    attn: nn.MultiheadAttention = block.attn
    batch, tokens, width = h.shape
    heads = attn.num_heads
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def dual_block(block: nn.Module, x: torch.Tensor, alt: torch.Tensor | None,
               path: DualPath, *, post_attn: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of the dual path: (original stream, alternate stream) -> next of both.

    Original: x + Attn(LN1(x)), then + MLP(LN2(.)) — the frozen block unchanged.
    Alternate: alt + AltAttn(LN1(x)) with alt = x at the first dual block; no MLP.
    qkv and the output projection are computed once for both paths.
    ``post_attn``, when given, receives ``"original"``: the original stream after the
    attention and before the MLP (Crane+'s D-Attn reads this state, see methods/crane.py).
    """
    q, k, v = split_qkv(block, block.ln_1(x))
    original = F.scaled_dot_product_attention(q, k, v)
    alternate = ALT_ATTENTIONS[path.attention](q, k, v)
    out_proj = block.attn.out_proj
    both = F.linear(merge_heads(torch.cat([original, alternate])), out_proj.weight, out_proj.bias)
    original_out, alternate_out = both[:q.shape[0]], both[q.shape[0]:]  # (slices keep an exported batch dynamic)
    x_next = x + block.ls_1(original_out)
    if post_attn is not None:
        post_attn["original"] = x_next
    x_next = x_next + block.ls_2(block.mlp(block.ln_2(x_next)))
    alt_next = (x if alt is None else alt) + block.ls_1(alternate_out)
    return x_next, alt_next


def dual_attention(block: nn.Module, h_in: torch.Tensor, attention: str = "vv") -> tuple[torch.Tensor, torch.Tensor]:
    """Both attention outputs of one frozen block on the *same* input stream ``h_in``:
    (original ls_1(out_proj(Attn(LN1(x)))), alternate ls_1(out_proj(AltAttn(LN1(x))))), sharing qkv."""
    q, k, v = split_qkv(block, block.ln_1(h_in))
    original = F.scaled_dot_product_attention(q, k, v)
    alternate = ALT_ATTENTIONS[attention](q, k, v)
    out_proj = block.attn.out_proj
    both = F.linear(merge_heads(torch.cat([original, alternate])), out_proj.weight, out_proj.bias)
    original_out, alternate_out = both[:q.shape[0]], both[q.shape[0]:]  # (slices keep an exported batch dynamic)
    return block.ls_1(original_out), block.ls_1(alternate_out)


@dataclass
class StagedTaps:
    """CLIP-AD's staged dual path outputs at the tapped 1-based layers: ``surgery`` = the v-v
    stream (CLS still the v-v one), ``original`` = the raw residual stream of the frozen path."""

    tokens: torch.Tensor
    surgery: dict[int, torch.Tensor]
    original: dict[int, torch.Tensor]


def staged_surgery_forward(blocks, x: torch.Tensor, taps, *, restart_every: float | None,
                           aliased_taps: bool = True, attention: str = "vv") -> StagedTaps:
    """CLIP-AD's staged dual path (architecture surgery in every block, restarted per stage).

    ``x`` is the ``ln_pre`` output. In every block the original path is the frozen block; the
    new path adds the block's v-v attention of LN1(*original* stream) to its own stream, with no
    skip connection from the original path and no MLP; it starts as the first block's v-v output
    and restarts (is replaced by the block's v-v output) at every 0-based block index i > 0 with
    ``i % restart_every == 0`` (the official ``count % (depth / 4)``), i.e. blocks 4, 7, 10 of 12.

    ``aliased_taps`` reproduces the official code's in-place updates of stored tensors: a tapped
    original-path state is the *next* block's post-attention, pre-MLP state (x_l + Attn_{l+1}),
    and a tapped new-path state is its stage accumulator as it stands after the last block of
    that stage (only taps at stage ends, e.g. 3/6/9/12, are unaffected). The last layer is exact.
    With ``aliased_taps=False`` every tap is the true state after its block.
    Blocks run in place on their own outputs; call it without autograd through the backbone.
    """
    taps = set(taps)
    surgery: dict[int, torch.Tensor] = {}
    original: dict[int, torch.Tensor] = {}
    alt: torch.Tensor | None = None
    for index, block in enumerate(blocks):
        original_out, alternate_out = dual_attention(block, x, attention)
        restart = alt is None or (restart_every is not None and index % restart_every == 0)
        if restart:
            alt = alternate_out
        else:
            alt.add_(alternate_out)  # in place: taps earlier in this stage see the whole stage
        if index == 0:
            x = x + original_out
        else:
            x.add_(original_out)  # in place: a tap of the previous block sees this attention
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        layer = index + 1
        if layer in taps:
            surgery[layer] = alt if aliased_taps else alt.clone()
            original[layer] = x if aliased_taps else x.clone()
    return StagedTaps(x, surgery, original)
