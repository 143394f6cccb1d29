"""A plain, independent re-statement of zqhang/AnomalyCLIP's test-time computation, written
from its semantics (tensor by tensor, loops, LND layout, no zsad code) to check ours against.

Inputs: an open_clip CLIP module (weights only are read) and the authors' checkpoint dict.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def _ln(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _mlp(x, block):
    h = F.linear(x, block.mlp.c_fc.weight, block.mlp.c_fc.bias)
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return F.linear(h, block.mlp.c_proj.weight, block.mlp.c_proj.bias)


def _attention(x, block, mode, mask=None):
    """x: (L, N, C). mode 'qk' = ordinary attention, 'vv' = v-v attention."""
    length, batch, width = x.shape
    heads = block.attn.num_heads
    d = width // heads
    qkv = F.linear(x.transpose(0, 1), block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = qkv.reshape(batch, length, 3, heads, d).permute(2, 0, 3, 1, 4)
    if mode == "vv":
        q, k = v, v
    logits = (q @ k.transpose(-2, -1)) * d ** -0.5
    if mask is not None:
        logits = logits + mask
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
    return F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias).transpose(0, 1)


def text_features(clip, prompt_learner: dict, fp16_deep: bool = True) -> torch.Tensor:
    states = []
    for s in ("pos", "neg"):
        emb = torch.cat([prompt_learner[f"token_prefix_{s}"], prompt_learner[f"ctx_{s}"],
                         prompt_learner[f"token_suffix_{s}"]], dim=2).reshape(-1, 77, prompt_learner[f"ctx_{s}"].shape[-1])
        states.append((emb, prompt_learner[f"tokenized_prompts_{s}"].reshape(-1, 77)))
    prompts = torch.cat([e for e, _ in states])
    ids = torch.cat([t for _, t in states])
    deep = [prompt_learner[f"compound_prompts_text.{i}"] for i in range(8) if f"compound_prompts_text.{i}" in prompt_learner]
    x = (prompts + clip.positional_embedding).permute(1, 0, 2)
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    counter = 0
    for i, block in enumerate(clip.transformer.resblocks):
        if i > 0 and counter < len(deep):
            ctx = deep[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2)
            if fp16_deep:
                ctx = ctx.half().float()
            n = ctx.shape[0]
            x = torch.cat([x[:1], ctx, x[1 + n:]], dim=0)
            counter += 1
        x = x + _attention(_ln(x, block.ln_1), block, "qk", mask)
        x = x + _mlp(_ln(x, block.ln_2), block)
    x = _ln(x.permute(1, 0, 2), clip.ln_final)
    feats = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ clip.text_projection
    feats = torch.stack(torch.chunk(feats, 2, dim=0), dim=1)  # (1, 2, E)
    return feats / feats.norm(dim=-1, keepdim=True)


def image_forward(clip, image: torch.Tensor, layers=(24,), dpam_layer: int = 20):
    visual = clip.visual
    x = visual.conv1(image).reshape(image.shape[0], visual.conv1.out_channels, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    pos = visual.positional_embedding
    side, new_side = int((pos.shape[0] - 1) ** 0.5), int((x.shape[1] - 1) ** 0.5)
    if side != new_side:
        grid = pos[1:].reshape(-1, side, side, pos.shape[-1]).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, (new_side, new_side), mode="bilinear")
        pos = torch.cat([pos[:1], grid.reshape(-1, pos.shape[-1], new_side * new_side).transpose(1, 2)[0]], 0)
    x = _ln(x + pos, visual.ln_pre).permute(1, 0, 2)
    blocks = visual.transformer.resblocks
    first_dual = len(blocks) - (dpam_layer - 1)  # 0-based index of the first DPAM block
    vv, tokens = None, []
    for i, block in enumerate(blocks):
        if i >= first_dual:
            h = _ln(x, block.ln_1)
            vv = (x if vv is None else vv) + _attention(h, block, "vv")
            x = x + _attention(h, block, "qk")
            x = x + _mlp(_ln(x, block.ln_2), block)
        else:
            x = x + _attention(_ln(x, block.ln_1), block, "qk")
            x = x + _mlp(_ln(x, block.ln_2), block)
        if i + 1 in layers:
            tokens.append((vv if vv is not None else x).clone())
    global_feature = x[0] @ visual.proj
    patches = [_ln(t.permute(1, 0, 2), visual.ln_post) @ visual.proj for t in tokens]
    return global_feature, patches


@torch.no_grad()
def anomalyclip_reference(clip, prompt_learner: dict, image: torch.Tensor, sigma: float = 4.0):
    """(image scores (B,), smoothed maps (B, S, S) as numpy)."""
    text = text_features(clip, prompt_learner)
    g, patches = image_forward(clip, image)
    g = g / g.norm(dim=-1, keepdim=True)
    scores = ((g[:, None] @ text.permute(0, 2, 1)) / 0.07).softmax(-1)[:, 0, 1]  # official: batch 1
    maps = []
    for p in patches:
        p = p / p.norm(dim=-1, keepdim=True)
        sim = ((p[:, :, None, :] * text[0][None, None]).sum(-1) / 0.07).softmax(-1)[:, 1:, :]
        side = int(sim.shape[1] ** 0.5)
        sim = F.interpolate(sim.reshape(-1, side, side, 2).permute(0, 3, 1, 2), image.shape[-1], mode="bilinear")
        sim = sim.permute(0, 2, 3, 1)
        maps.append((sim[..., 1] + 1 - sim[..., 0]) / 2.0)
    amap = torch.stack(maps).sum(0)
    return scores, np.stack([gaussian_filter(m, sigma=sigma) for m in amap.numpy()])
