"""A plain, independent re-statement of ByChelsea/CLIP-AD's SDP / SDP+ test computation, written
from its semantics (LND layout, explicit attention, the official in-place updates of the stored
[surgery, original] tensors, the representative vectors with their fp16 rounding), no zsad
code. fp32 throughout, as the official code runs on a CPU (text vectors cast to fp32 for the
matmuls, which the official code leaves to CUDA autocast).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

NORMAL = ["flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
          "{} without scratch", "{} without crack", "{} without contamination"]
ABNORMAL = ["damaged {}", "imperfect {}", "blemished {}", "broken {}", "{} with flaw", "{} with defect",
            "{} with damage", "{} with scratch", "{} with crack", "{} with contamination"]
TEMPLATES = ["a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
             "a close-up photo of the {}.", "a bright photo of a {}.", "a bright photo of the {}.",
             "a dark photo of the {}.", "a dark photo of a {}.", "a jpeg corrupted photo of a {}.",
             "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
             "a photo of the {}.", "a photo of a {}.", "a photo of a large {}.", "a photo of the small {}.",
             "a photo of the large {}.", "a photo of a small {}.", "a photo of the {} for visual inspection.",
             "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.",
             "a photo of a {} for anomaly detection."]


def _ln(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _mlp(x, block):
    h = F.gelu(F.linear(x, block.mlp.c_fc.weight, block.mlp.c_fc.bias))
    return F.linear(h, block.mlp.c_proj.weight, block.mlp.c_proj.bias)


def _attn(x, block, mode, mask=None):
    """(L, N, C) -> (L, N, C); mode 'qk' or 'vv' (q = k = v)."""
    length, batch, width = x.shape
    heads = block.attn.num_heads
    d = width // heads
    qkv = F.linear(x.transpose(0, 1), block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = qkv.reshape(batch, length, 3, heads, d).permute(2, 0, 3, 1, 4)
    if mode == "vv":
        q = k = v
    logits = (q @ k.transpose(-2, -1)) * d ** -0.5
    if mask is not None:
        logits = logits + mask
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
    return F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias).transpose(0, 1)


def encode_text(clip, texts):
    from open_clip.tokenizer import tokenize

    ids = tokenize(texts)
    x = (clip.token_embedding(ids) + clip.positional_embedding).permute(1, 0, 2)
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    for block in clip.transformer.resblocks:
        x = x + _attn(_ln(x, block.ln_1), block, "qk", mask)
        x = x + _mlp(_ln(x, block.ln_2), block)
    x = _ln(x.permute(1, 0, 2), clip.ln_final)
    return x[torch.arange(len(texts)), ids.argmax(dim=-1)] @ clip.text_projection


def _rep_vector(emb: torch.Tensor, rep_vec: str, dataset: str, eps_min=None):
    if rep_vec == "mean":
        v = emb.mean(dim=0)
        v /= v.norm()
        return v
    data = emb.numpy()
    if rep_vec == "pca":
        X = emb.permute(1, 0).numpy().astype(np.float32)
        mean = np.array([np.mean(X[:, i]) for i in range(X.shape[1])])
        Xc = X - mean
        vals, vecs = np.linalg.eig(np.dot(np.transpose(Xc), Xc))
        order = sorted(range(len(vals)), key=lambda i: -abs(vals[i]))
        feature = np.array([vecs[:, order[0]]])
        v = torch.tensor(np.dot(Xc, np.transpose(feature)), dtype=torch.float16).squeeze()
        if torch.dot(emb.mean(dim=0), v.float()) < 0:
            v = -v
    elif rep_vec == "kde":
        from sklearn.neighbors import KernelDensity

        logd = KernelDensity(kernel="gaussian", bandwidth=0.3).fit(data).score_samples(data)[:, None]
        v = torch.tensor(np.sum(np.exp(logd) * data, axis=0) / np.sum(np.exp(logd)), dtype=torch.float16)
    else:
        from sklearn.cluster import DBSCAN, MeanShift

        if rep_vec == "dbscan":
            eps, ms = eps_min or ((1.5, 25) if dataset == "visa" else (0.5, 15))
            labels = DBSCAN(eps=eps, min_samples=ms).fit(data).labels_
        else:
            labels = MeanShift(bandwidth=2).fit(data).labels_
        label = np.argmax(np.bincount(labels[labels >= 0]))
        v = torch.tensor(np.mean(data[labels == label], axis=0), dtype=torch.float16)
    v /= v.norm()
    return v


_ENCODED: dict = {}  # (model, class) -> normalised prompt embeddings per state (tests reuse them)


@torch.no_grad()
def text_features(clip, class_name, rep_vec="dbscan", dataset="mvtec", eps_min=None):
    """(2, E) fp32 [normal, anomalous]."""
    key = (id(clip), class_name)
    if key not in _ENCODED:
        encoded = []
        for states in (NORMAL, ABNORMAL):
            emb = encode_text(clip, [t.format(s.format(class_name)) for s in states for t in TEMPLATES])
            emb /= emb.norm(dim=-1, keepdim=True)
            encoded.append(emb)
        _ENCODED[key] = encoded
    return torch.stack([_rep_vector(emb.clone(), rep_vec, dataset, eps_min).float() for emb in _ENCODED[key]])


@torch.no_grad()
def staged_forward(clip, images, layers=(3, 6, 9, 12)):
    """{'surgery': [(B, L, E)], 'ori': [(B, L, C)]} with the official in-place semantics."""
    visual = clip.visual
    x = visual.conv1(images).reshape(images.shape[0], visual.conv1.out_channels, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = _ln(x + visual.positional_embedding, visual.ln_pre).permute(1, 0, 2)
    blocks = visual.transformer.resblocks
    state, stored = x, []
    for count, block in enumerate(blocks):
        if count == 0:
            new = _attn(_ln(state, block.ln_1), block, "vv")
            ori = state + _attn(_ln(state, block.ln_1), block, "qk")
            ori = ori + _mlp(_ln(ori, block.ln_2), block)
            state = [new, ori]
        else:
            new, ori = state
            h = _ln(ori, block.ln_1)
            vv, qk = _attn(h, block, "vv"), _attn(h, block, "qk")
            if count % (len(blocks) / 4) == 0:
                new = vv
            else:
                new += vv  # in place on the stored tensor
            ori += qk  # in place on the stored tensor
            ori = ori + _mlp(_ln(ori, block.ln_2), block)
            state = [new, ori]
        if count + 1 in layers:
            stored.append(state)
    out = {"surgery": [], "ori": []}
    for new, ori in stored:
        new[0, :, :] = ori[0, :, :]  # the CLS swap, in place
        out["surgery"].append(_ln(new.permute(1, 0, 2), visual.ln_post) @ visual.proj)
        out["ori"].append(ori.permute(1, 0, 2))
    return out


def _surgery(features, text):
    total = 0
    for f in features:
        prob = (f[:, :1, :] @ text.T).softmax(-1)
        w = prob / prob.mean(-1, keepdim=True)
        feats = f[:, :, None, :] * text[None, None] * w[:, :, :, None]
        total = total + (feats - feats.mean(2, keepdim=True)).sum(-1)
    return total


@torch.no_grad()
def clip_ad_reference(clip, images, class_name="object", rep_vec="dbscan", dataset="mvtec", sigma=8,
                      heads=None, eps_min=None):
    """(CLS scores (B,), smoothed maps (B, S, S) numpy). ``heads``: SDP+ fc state dict."""
    size = images.shape[-1]
    text = text_features(clip, class_name, rep_vec, dataset, eps_min)
    feats = staged_forward(clip, images)
    surgery = [f / f.norm(dim=-1, keepdim=True) for f in feats["surgery"]]
    sim = _surgery(surgery, text)[:, 1:, :]
    side = int(sim.shape[1] ** 0.5)
    sim = F.interpolate(sim.reshape(-1, side, side, 2).permute(0, 3, 1, 2), (size, size), mode="bilinear")
    amap = sim[:, 1].numpy()
    if heads is not None:
        ft = []
        for i, ori in enumerate(feats["ori"]):
            f = F.linear(ori[:, 1:, :], heads[f"fc.{i}.weight"], heads[f"fc.{i}.bias"])
            f = f / f.norm(dim=-1, keepdim=True)
            logits = (100.0 * f @ text.T).permute(0, 2, 1).reshape(-1, 2, side, side)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
            ft.append(torch.softmax(logits, dim=1)[:, 1].numpy())
        amap = amap + np.sum(ft, axis=0)
    amap = np.stack([gaussian_filter(m, sigma=sigma) for m in amap])
    scores = (100.0 * surgery[-1][:, 0] @ text.T).softmax(-1)[:, 1]
    return scores, amap


def _focal(probs, target, gamma=2.0, smooth=1e-5):
    """Hsuxu's FocalLoss as CLIP-AD calls it: alpha 1, one-hot clamped to [smooth, 1 - smooth]."""
    c = probs.shape[1]
    flat = probs.permute(0, 2, 3, 1).reshape(-1, c)
    one_hot = torch.zeros(flat.shape[0], c).scatter_(1, target.reshape(-1, 1).long(), 1)
    one_hot = torch.clamp(one_hot, smooth / (c - 1), 1.0 - smooth)
    pt = (one_hot * flat).sum(1) + smooth
    return (-1 * torch.pow(1 - pt, gamma) * pt.log()).mean()


def _dice(pred, target):
    n = target.shape[0]
    p, t = pred.reshape(n, -1), target.reshape(n, -1)
    return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum() / n


def sdp_plus_loss(clip, images, masks, heads, class_names, rep_vec="dbscan", dataset="mvtec"):
    """train.py's loss for one batch: sum over layers of focal(2-class map) + dice(anomalous map)."""
    size = images.shape[-1]
    text = torch.stack([text_features(clip, c, rep_vec, dataset) for c in class_names])  # (B, 2, E)
    feats = staged_forward(clip, images)
    loss = 0
    for i, ori in enumerate(feats["ori"]):
        f = F.linear(ori[:, 1:, :], heads[f"fc.{i}.weight"], heads[f"fc.{i}.bias"])
        f = f / f.norm(dim=-1, keepdim=True)
        logits = 100.0 * f @ text.permute(0, 2, 1)  # (B, L, 2)
        side = int(logits.shape[1] ** 0.5)
        logits = logits.permute(0, 2, 1).reshape(-1, 2, side, side)
        probs = torch.softmax(F.interpolate(logits, size=size, mode="bilinear", align_corners=True), dim=1)
        loss = loss + _focal(probs, masks) + _dice(probs[:, 1], masks)
    return loss
