"""A plain, independent re-statement of kim0806/ViP2-CLIP's test-time computation, written from
its semantics (tensor by tensor, LND layout, one image at a time, no zsad code) to check ours.

Inputs: a CLIP state dict in OpenAI/open_clip key names (float32), the authors' checkpoint
``{"prompt_learner": ..., "Zero_try": ...}`` and preprocessed images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def _ln(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], 1e-5)


def _block(x, sd, prefix, mask=None):
    """One residual attention block, x (L, N, C), heads = C // 64, QuickGELU."""
    length, batch, width = x.shape
    heads = max(1, width // 64)
    d = width // heads
    h = _ln(x, sd, f"{prefix}.ln_1")
    qkv = F.linear(h, sd[f"{prefix}.attn.in_proj_weight"], sd[f"{prefix}.attn.in_proj_bias"])
    q, k, v = qkv.reshape(length, batch, 3, heads, d).permute(2, 1, 3, 0, 4)  # (N, h, L, d) each
    logits = q @ k.transpose(-2, -1) / d ** 0.5
    if mask is not None:
        logits = logits + mask
    out = (logits.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(length, batch, width)
    x = x + F.linear(out, sd[f"{prefix}.attn.out_proj.weight"], sd[f"{prefix}.attn.out_proj.bias"])
    h = F.linear(_ln(x, sd, f"{prefix}.ln_2"), sd[f"{prefix}.mlp.c_fc.weight"], sd[f"{prefix}.mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)
    return x + F.linear(h, sd[f"{prefix}.mlp.c_proj.weight"], sd[f"{prefix}.mlp.c_proj.bias"])


def _count(sd, prefix):
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def encode_image(sd, image, features_list=(6, 12, 18, 24)):
    """(global feature = CLS @ proj without ln_post, [ln_post(tokens) @ proj per tapped layer])."""
    w = sd["visual.conv1.weight"]
    x = F.conv2d(image, w, stride=w.shape[-1]).reshape(image.shape[0], w.shape[0], -1).permute(0, 2, 1)
    x = torch.cat([sd["visual.class_embedding"] + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    pos = sd["visual.positional_embedding"]
    side, new_side = int((pos.shape[0] - 1) ** 0.5), int((x.shape[1] - 1) ** 0.5)
    if side != new_side:
        grid = pos[1:].reshape(-1, side, side, pos.shape[-1]).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, (new_side, new_side), mode="bilinear")
        pos = torch.cat([pos[:1], grid.reshape(-1, pos.shape[-1], new_side * new_side).transpose(1, 2)[0]], 0)
    x = _ln(x + pos, sd, "visual.ln_pre").permute(1, 0, 2)
    tapped = []
    for i in range(_count(sd, "visual.transformer.resblocks.")):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}")
        if i + 1 in features_list:
            tapped.append(x)
    patches = [_ln(t.permute(1, 0, 2), sd, "visual.ln_post") @ sd["visual.proj"] for t in tapped]
    return x[0] @ sd["visual.proj"], patches


def ica_prompts(pl, g):
    """The authors' ICA forward: (prompts (2N, 77, W), token ids (2N, 77))."""
    n = g.shape[0]
    x = g.reshape(n, 1, -1) + pl["cls_prompter.bias"]
    mlps = sorted({int(k.split(".")[2]) for k in pl if k.startswith("cls_prompter.fc.")})
    outs = []
    for i in mlps:
        h = F.relu(F.linear(x, pl[f"cls_prompter.fc.{i}.0.weight"], pl[f"cls_prompter.fc.{i}.0.bias"]))
        outs.append(F.linear(h, pl[f"cls_prompter.fc.{i}.2.weight"], pl[f"cls_prompter.fc.{i}.2.bias"]))
    ctx_cls = pl["cls_ctx"].unsqueeze(0) + torch.cat(outs, dim=1)
    prompts = []
    for s in ("pos", "neg"):
        prompts.append(torch.cat([pl[f"token_prefix_{s}"].expand(n, -1, -1), pl[f"ctx_{s}"].unsqueeze(0).expand(n, -1, -1),
                                  pl[f"token_middle_{s}"].expand(n, -1, -1), ctx_cls,
                                  pl[f"token_suffix_{s}"].expand(n, -1, -1)], dim=1))
    tokens = torch.cat([pl["tokenized_prompts_pos"].expand(n, -1), pl["tokenized_prompts_neg"].expand(n, -1)])
    return torch.cat(prompts), tokens


def encode_text_learn(sd, prompts, tokens):
    length = prompts.shape[1]
    x = (prompts + sd["positional_embedding"]).permute(1, 0, 2)
    mask = torch.full((length, length), float("-inf")).triu_(1)
    for i in range(_count(sd, "transformer.resblocks.")):
        x = _block(x, sd, f"transformer.resblocks.{i}", mask)
    x = _ln(x.permute(1, 0, 2), sd, "ln_final")
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ sd["text_projection"]


def fgp(z, text, patches, heads=8):
    """The authors' FGP: 1x1 convolutions, unscaled logits, softmax over patches, L2."""
    def conv(name, x):  # x (B, N, C) -> Conv1d over channels
        return F.conv1d(x.permute(0, 2, 1), z[f"{name}.weight"], z[f"{name}.bias"]).permute(0, 2, 1)

    b, nt, c = text.shape
    d = c // heads
    q = conv("q_proj_pre", text).reshape(b, nt, heads, d)
    k = conv("k_proj_pre_1", patches).reshape(b, -1, heads, d)
    v = conv("v_proj_pre_1", patches).reshape(b, -1, heads, d)
    attn = torch.einsum("bnkc,bmkc->bknm", q, k).softmax(dim=-1)
    out = torch.einsum("bknm,bmkc->bnkc", attn, v).reshape(b, nt, c)
    out = conv("proj_post_t", out)
    return out / out.norm(dim=-1, keepdim=True)


@torch.no_grad()
def vip2clip_reference(sd, checkpoint, images, topk=50, sigma=8, features_list=(6, 12, 18, 24), use_fgp=True):
    """Per image, as test.py runs (batch 1): (image scores (B,), smoothed maps (B, S, S) numpy)."""
    pl, z = checkpoint["prompt_learner"], checkpoint["Zero_try"]
    size = images.shape[-1]
    scores, maps = [], []
    for image in images:
        g, patch_features = encode_image(sd, image[None], features_list)
        g = g / g.norm(dim=-1, keepdim=True)
        prompts, tokens = ica_prompts(pl, g)
        text = encode_text_learn(sd, prompts, tokens).float()
        text = torch.stack(torch.chunk(text, dim=0, chunks=2), dim=1)
        text = text / text.norm(dim=-1, keepdim=True)
        layer_maps, picked = [], []
        for pf in patch_features:
            pf = pf / pf.norm(dim=-1, keepdim=True)
            aux = fgp(z, text, pf[:, 1:, :]) if use_fgp else text
            cos = torch.matmul(pf[:, 1:, :], aux.transpose(1, 2))
            sim = (cos / 0.07).softmax(-1)
            side = int(sim.shape[1] ** 0.5)
            up = F.interpolate(sim.reshape(1, side, side, -1).permute(0, 3, 1, 2), size, mode="bilinear")
            up = up.permute(0, 2, 3, 1)
            layer_maps.append((up[..., 1] + 1 - up[..., 0]) / 2.0)
            idx = torch.topk(sim[:, :, 1], k=topk, dim=-1, sorted=False).indices
            picked.append(cos[0, idx[0]][None])
        mean = torch.mean(torch.cat(picked, dim=1), dim=1)
        scores.append(float((mean / 0.07).softmax(-1)[0, 1]))
        amap = torch.stack(layer_maps).mean(0)[0].numpy()
        maps.append(gaussian_filter(amap, sigma=sigma) if sigma else amap)
    return torch.tensor(scores), np.stack(maps)


def _official_focal(probs, target, gamma=2.0, smooth=1e-5):
    """Hsuxu's FocalLoss as train.py calls it: probabilities in, alpha = 1, mean."""
    c = probs.shape[1]
    logit = probs.reshape(probs.shape[0], c, -1).permute(0, 2, 1).reshape(-1, c)
    idx = target.reshape(-1, 1).long()
    one_hot = torch.zeros(idx.shape[0], c).scatter_(1, idx, 1)
    one_hot = torch.clamp(one_hot, smooth / (c - 1), 1.0 - smooth)
    pt = (one_hot * logit).sum(1) + smooth
    return (-1 * torch.pow(1 - pt, gamma) * pt.log()).mean()


def _official_dice(pred, target):
    n = target.shape[0]
    p, t = pred.reshape(n, -1), target.reshape(n, -1)
    return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum() / n


def vip2clip_train_loss_reference(sd, checkpoint, images, gt, labels, topk=50, features_list=(6, 12, 18, 24)):
    """train.py's loss on one batch (batched, as its loop runs): sum over layers of
    focal + dice(S_a, gt) + dice(S_n, 1 - gt), plus CE of the top-k mean logits."""
    pl, z = checkpoint["prompt_learner"], checkpoint["Zero_try"]
    size = images.shape[-1]
    with torch.no_grad():
        g, patch_features = encode_image(sd, images, features_list)
        g = g / g.norm(dim=-1, keepdim=True)
    prompts, tokens = ica_prompts(pl, g)
    text = encode_text_learn(sd, prompts, tokens).float()
    text = torch.stack(torch.chunk(text, dim=0, chunks=2), dim=1)
    text = text / text.norm(dim=-1, keepdim=True)
    maps, picked = [], []
    for pf in patch_features:
        pf = pf / pf.norm(dim=-1, keepdim=True)
        cos = torch.matmul(pf[:, 1:, :], fgp(z, text, pf[:, 1:, :]).transpose(1, 2))
        sim = (cos / 0.07).softmax(-1)
        side = int(sim.shape[1] ** 0.5)
        maps.append(F.interpolate(sim.reshape(-1, side, side, 2).permute(0, 3, 1, 2), size, mode="bilinear"))
        idx = torch.topk(sim[:, :, 1], k=topk, dim=-1, sorted=False).indices
        rows = torch.arange(cos.shape[0]).unsqueeze(1).expand(-1, topk)
        picked.append(cos[rows, idx])
    logits = torch.mean(torch.cat(picked, dim=1), dim=1) / 0.07
    loss = F.cross_entropy(logits, labels.long())
    for m in maps:
        loss = loss + _official_focal(m, gt) + _official_dice(m[:, 1], gt) + _official_dice(m[:, 0], 1 - gt)
    return loss
