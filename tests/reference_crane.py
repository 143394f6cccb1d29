"""A plain, independent re-statement of AlirezaSalehy/Crane's computation (test.py's
ScoreCalculator, models/Crane.py, the PromptLearner and train.py's loss), written from its
semantics — LND layout, explicit softmaxes, the in-place updates spelled out — with no zsad code.

Inputs: an open_clip CLIP module (weights only are read), the authors' prompt-learner dict and,
for Crane+, a DINOv2-with-registers state dict in the facebookresearch layout.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _ln(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _mlp(x, block):
    h = F.linear(x, block.mlp.c_fc.weight, block.mlp.c_fc.bias)
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return F.linear(h, block.mlp.c_proj.weight, block.mlp.c_proj.bias)


def _heads(x, block):
    """x (L, B, C) -> q, k, v (B, H, L, d)."""
    length, batch, width = x.shape
    heads = block.attn.num_heads
    qkv = F.linear(x.transpose(0, 1), block.attn.in_proj_weight, block.attn.in_proj_bias)
    return qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)


def _weights(a, b, scale):
    return ((a @ b.transpose(-2, -1)) * scale).softmax(-1)


def _out(weights, v, block):
    batch, heads, length, d = v.shape
    out = (weights @ v).transpose(1, 2).reshape(batch, length, heads * d)
    return F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias).transpose(0, 1)


def _attn(x, block, mask=None):
    q, k, v = _heads(x, block)
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits + mask
    return _out(logits.softmax(-1), v, block)


def _eattn(x, block):
    """qq+kk+vv: three softmaxes summed, not renormalised."""
    q, k, v = _heads(x, block)
    s = q.shape[-1] ** -0.5
    return _out(_weights(v, v, s) + _weights(k, k, s) + _weights(q, q, s), v, block)


# ------------------------------------------------------------------ DINOv2 (torch.hub semantics)
def dino_features(state: dict, clip_image: torch.Tensor, patch: int = 14, registers: int = 4) -> torch.Tensor:
    mean, std = torch.tensor(OPENAI_MEAN).view(-1, 1, 1), torch.tensor(OPENAI_STD).view(-1, 1, 1)
    x = (clip_image * std + mean).clamp(0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)) / torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    batch, _, height, width = x.shape
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    gh, gw = tokens.shape[-2:]
    tokens = tokens.flatten(2).transpose(1, 2)
    dim = tokens.shape[-1]
    tokens = torch.cat([state["cls_token"].expand(batch, -1, -1), tokens], dim=1)
    pos = state["pos_embed"]
    side = int((pos.shape[1] - 1) ** 0.5)
    if side * side != gh * gw:
        grid = F.interpolate(pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2), size=(gh, gw),
                             mode="bicubic", antialias=True)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    tokens = tokens + pos
    tokens = torch.cat([tokens[:, :1], state["register_tokens"].expand(batch, -1, -1), tokens[:, 1:]], dim=1)
    heads = max(1, dim // 64)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})

    def ln(t, name):
        return F.layer_norm(t, (dim,), state[name + ".weight"], state[name + ".bias"], 1e-6)

    for i in range(depth):
        p = f"blocks.{i}."
        h = ln(tokens, p + "norm1")
        qkv = F.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        att = _weights(q, k, (dim // heads) ** -0.5) @ v
        att = F.linear(att.transpose(1, 2).reshape(batch, -1, dim), state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        tokens = tokens + att * state[p + "ls1.gamma"]
        h = F.linear(ln(tokens, p + "norm2"), state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])
        h = F.linear(F.gelu(h), state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        tokens = tokens + h * state[p + "ls2.gamma"]
    tokens = ln(tokens, "norm")[:, 1 + registers:]
    return tokens.reshape(batch, gh, gw, dim).permute(0, 3, 1, 2)


def _dattn(block, layer_input, dino, grid, beta, gamma, batch_mean):
    """custom_attn: cosine Gram of the DINO features, centred, masked, softmax; values of the block."""
    length, batch, width = layer_input.shape
    x = _ln(layer_input, block.ln_1)
    v = F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)[2]  # (L, B, C)
    v = v[1:].permute(1, 0, 2)  # (B, N, C)
    _, _, dh, dw = dino.shape
    if (dh, dw) != (grid, grid):
        v = F.interpolate(v.reshape(batch, grid, grid, width).permute(0, 3, 1, 2), size=(dh, dw), mode="bilinear",
                          align_corners=False).permute(0, 2, 3, 1).reshape(batch, dh * dw, width)
    f = F.normalize(dino.flatten(2, 3), dim=1)
    sim = torch.einsum("bcm,bcn->bmn", f, f)
    means = [sim.mean()] * batch if batch_mean else [sim[b].mean() for b in range(batch)]
    rows = []
    for b in range(batch):
        s = (sim[b] - means[b] * beta) * gamma
        s[s < 0] = float("-inf")
        rows.append(s.softmax(-1) @ v[b])
    out = torch.stack(rows)
    return F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias)  # (B, N, C), no residual


# ------------------------------------------------------------------ vision
def image_forward(clip, image, layers, dino=None, beta=1.2, gamma=3.0, batch_mean=False, eattn_blocks=19):
    """(global feature (B, E) with ln_post, patch sets [(B, N, E)], grid) — unnormalised."""
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
    first = len(blocks) - eattn_blocks  # 0-based: replace_with_EAttn(20) swaps resblocks[-1..-19]
    refined = None
    sets: list = []
    for i, block in enumerate(blocks):
        if i >= first:
            h = _ln(x, block.ln_1)
            e, o = _eattn(h, block), _attn(h, block)
            if refined is None:
                refined = x + e           # `x += x_res`: the block's input tensor itself becomes the E-Attn stream
                read_by_dattn = refined
            else:
                read_by_dattn = x + o     # `x_ori += x_ori_res` before D-Attn reads x[1]
                refined = refined + e
            x = x + o
            x = x + _mlp(_ln(x, block.ln_2), block)
        else:
            read_by_dattn = x
            x = x + _attn(_ln(x, block.ln_1), block)
            x = x + _mlp(_ln(x, block.ln_2), block)
        if i + 1 in layers:
            if dino is not None:
                sets.append(_dattn(block, read_by_dattn, dino, new_side, beta, gamma, batch_mean))
            sets.append("E-Attn")  # a view of the E-Attn stream, which later blocks keep updating
    sets = [refined[1:].permute(1, 0, 2) if s == "E-Attn" else s for s in sets]  # ... so all equal the final one
    patches = [_ln(s, visual.ln_post) @ visual.proj for s in sets]
    global_feature = _ln(x.permute(1, 0, 2), visual.ln_post)[:, 0] @ visual.proj
    return global_feature, patches, new_side


# ------------------------------------------------------------------ text
def _encode(clip, prompts, ids, deep, fp16_deep=True):
    x = (prompts + clip.positional_embedding).permute(1, 0, 2)
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    counter = 0
    for i, block in enumerate(clip.transformer.resblocks):
        if i > 0 and counter < len(deep):
            ctx = deep[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2)
            ctx = ctx.half().float() if fp16_deep else ctx
            x = torch.cat([x[:1], ctx, x[1 + ctx.shape[0]:]], dim=0)
            counter += 1
        x = x + _attn(_ln(x, block.ln_1), block, mask)
        x = x + _mlp(_ln(x, block.ln_2), block)
    x = _ln(x.permute(1, 0, 2), clip.ln_final)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ clip.text_projection


def _deep(pl):
    return [pl[f"compound_prompts_text.{i}"] for i in range(8) if f"compound_prompts_text.{i}" in pl]


def static_text(clip, pl):
    prompts = torch.cat([torch.cat([pl[f"token_prefix_{s}"], pl[f"ctx_{s}"], pl[f"token_suffix_{s}"]], dim=2)
                         .reshape(-1, 77, pl[f"ctx_{s}"].shape[-1]) for s in ("pos", "neg")])
    ids = torch.cat([pl[f"tokenized_prompts_{s}"].reshape(-1, 77) for s in ("pos", "neg")])
    feats = _encode(clip, prompts, ids, _deep(pl))
    feats = torch.stack(torch.chunk(feats, 2, dim=0), dim=1)  # (1, 2, E)
    return F.normalize(feats, dim=-1)


def context_text(clip, pl, img_emb):
    """pad_suffix: the image embedding after the context, last suffix token dropped, the token id
    at the insertion index repeated."""
    batch = img_emb.shape[0]
    out = []
    for s in ("pos", "neg"):
        ctx = torch.cat([pl[f"ctx_{s}"].unsqueeze(0).expand(batch, -1, -1, -1, -1), img_emb.view(batch, 1, 1, 1, -1)], dim=3)
        prefix = pl[f"token_prefix_{s}"].unsqueeze(0).expand(batch, -1, -1, -1, -1)
        suffix = pl[f"token_suffix_{s}"].unsqueeze(0).expand(batch, -1, -1, -1, -1)[:, :, :, :-1]
        ids = pl[f"tokenized_prompts_{s}"].unsqueeze(0).repeat(batch, 1, 1, 1)
        at = prefix.shape[-2] + ctx.shape[-2]
        ids = torch.cat([ids[..., :at], ids[..., at:at + 1], ids[..., at:]], dim=-1)[..., :-1]
        prompts = torch.cat([prefix, ctx, suffix], dim=3).reshape(batch, 77, -1)
        out.append(_encode(clip, prompts, ids.reshape(batch, 77), _deep(pl)))
    return F.normalize(torch.stack(out, dim=1), dim=-1)  # (B, 2, E)


# ------------------------------------------------------------------ scores
def _logits(features, text, temp):
    f = features.unsqueeze(1) if features.dim() == 2 else features
    out = (f @ text.permute(0, 2, 1)) / temp
    return out.squeeze(1) if features.dim() == 2 else out


def _regrid(flat, size, mode="bilinear"):
    side = int(flat.shape[1] ** 0.5)
    return F.interpolate(flat.reshape(flat.shape[0], side, side, -1).permute(0, 3, 1, 2), (size, size),
                         mode=mode).permute(0, 2, 3, 1)


def _pooled_image_feature(g, patches, pixel_logits, alpha=0.5):
    weights = torch.stack(pixel_logits, dim=1).mean(dim=1).softmax(-1)[:, :, 1].unsqueeze(-1)
    cluster = F.normalize((torch.stack(patches).mean(dim=0) * weights).sum(dim=1), dim=1)
    return F.normalize(alpha * cluster + (1 - alpha) * g, dim=1)


@torch.no_grad()
def crane_reference(clip, pl, image, *, layers=(6, 12, 18, 24), dino_state=None, soft_mean=True,
                    batch_mean=False, sbp=True, sigma=4.0):
    """(image scores (B,), smoothed maps (B, S, S) numpy), test.py's path with static prompts."""
    text = static_text(clip, pl)
    dino = dino_features(dino_state, image) if dino_state is not None else None
    g, patches, _ = image_forward(clip, image, layers, dino, batch_mean=batch_mean)
    g = g / g.norm(dim=-1, keepdim=True)
    patches = [p / p.norm(dim=-1, keepdim=True) for p in patches]
    logits = [_logits(p, text, 0.07) for p in patches]
    size = image.shape[-1]
    if soft_mean:
        score = torch.stack([_regrid(l.softmax(-1), size) for l in logits]).mean(0)
    else:
        score = torch.stack([_regrid(l, size) for l in logits]).mean(0).softmax(-1)
    amap = score[..., 1]
    if sbp:
        g = _pooled_image_feature(g, patches, logits)
    scores = _logits(g, text, 0.07).softmax(-1)[:, 1]
    return scores, np.stack([gaussian_filter(m, sigma=sigma) for m in amap.numpy()])


def _focal(probs, target, gamma=2.0, smooth=1e-5):
    c = probs.shape[1]
    flat = probs.reshape(probs.shape[0], c, -1).permute(0, 2, 1).reshape(-1, c)
    idx = target.reshape(-1, 1).long()
    onehot = torch.zeros(idx.shape[0], c).scatter_(1, idx, 1).clamp(smooth / (c - 1), 1 - smooth)
    pt = (onehot * flat).sum(1) + smooth
    return (-(1 - pt) ** gamma * pt.log()).mean()


def _dice(pred, target):
    n = target.shape[0]
    p, t = pred.reshape(n, -1), target.reshape(n, -1)
    return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum() / n


def crane_reference_loss(clip, pl, images, masks, labels, *, layers=(6, 12, 18, 24), dino_state=None):
    """train.py, one batch, context-guided prompts with probability 1 (nearest upsampling)."""
    with torch.no_grad():
        dino = dino_features(dino_state, images) if dino_state is not None else None
        g, patches, _ = image_forward(clip, images, layers, dino)
    g = g / g.norm(dim=-1, keepdim=True)
    patches = [p / p.norm(dim=-1, keepdim=True) for p in patches]
    text = context_text(clip, pl, g)
    size = images.shape[-1]
    focal = dice = 0
    logits = []
    for p in patches:
        lg = _logits(p, text, 0.07)
        logits.append(lg)
        sm = _regrid(lg.softmax(-1), size, mode="nearest")
        dice = dice + _dice((1 - sm[..., 0] + sm[..., 1]) / 2, masks)
        focal = focal + _focal(sm.permute(0, 3, 1, 2), masks)
    image_logits = _logits(_pooled_image_feature(g, patches, logits), text, 0.01)
    ce = F.cross_entropy(image_logits, labels.long())
    return 2 * focal + 2 * dice + 0.2 * ce
