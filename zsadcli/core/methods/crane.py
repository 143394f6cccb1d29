"""Crane and Crane+ (Salehi et al., arXiv 2504.11055), as AlirezaSalehy/Crane computes them.

Vision (both):
- E-Attn dual path (``core.attention``, "qq+kk+vv": softmax(QQ^T s) + softmax(KK^T s) +
  softmax(VV^T s), not renormalised) over the last 19 blocks (6-24 of ViT-L/14), no MLP on
  that path, exactly AnomalyCLIP's DPAM recursion with another attention.
- The official code collects the E-Attn tokens of every requested layer as views of one tensor
  that later blocks update in place, so Crane's "6 12 18 24" are four copies of the final
  E-Attn stream; ``alias_layers`` (default on) reproduces that (inference equals layer 24
  alone, the training loss counts the map terms four times).
- Patch features: ln_post + proj; global feature: original-path CLS with ln_post + proj.

Crane+ adds D-Attn: attention weights from the cosine Gram matrix of DINOv2 ViT-B/14-reg4
features (last block after the final norm), ``S' = gamma (S - beta mean(S))``, negatives
masked, row softmax, the same for all heads; values from the CLIP block's value projection of
LN1 of the state the official code reads — block 24's input *after* its attention updated it in
place, LN1(x23 + Attn24(LN1(x23))) — then out_proj, no residual, ln_post + proj. Each layer
yields two patch sets, [D-Attn, E-Attn]. The official centring mean runs over the whole batch
(scores depend on batch composition); ours defaults to the per-image mean, which equals the
official code at batch 1 (``dattn_mean: batch`` reproduces the authors' setting).

Text: AnomalyCLIP's object-agnostic prompt learner (no projection layers). In training the
L2-normalised global image feature is inserted after the context tokens of both prompts
(``pad_suffix``; probability ``context_prob_train`` = 1), so text is encoded per image; at
test the prompts are static (``context_prob_test`` = 0) and encoded once.

Scores: cosine / 0.07 per patch set; map = softmax-then-mean (``soft_mean``) or
mean-then-softmax of the bilinearly upsampled sets, Gaussian sigma 4. Image: score-based
pooling — patch features averaged over sets, weighted by the anomaly probability of the
set-mean logits, L2-normalised, mixed 0.5/0.5 with the global feature — then softmax(cos/T),
T = 0.07 at test and 0.01 in training. The authors' test script turns ``soft_mean`` on for
Crane, and for Crane+ only on DAGM and the medical sets (where it also uses the epoch-1
weights): ``soft_mean: null`` follows that per dataset (``zsad eval`` tells the method the
dataset; ``predict`` knows none and uses the industrial setting).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zsadcli.core.attention import ALT_ATTENTIONS, DualPath, dual_block
from zsadcli.core.graph import capturing
from zsadcli.core.losses import dice_loss, focal_loss
from zsadcli.core.methods import register_method
from zsadcli.core.methods.base import Method, MethodOutput, TrainRecipe
from zsadcli.core.postprocess import gaussian_smooth
from zsadcli.core.prompts import STATES, ObjectAgnosticPrompts
from zsadcli.data.images import OPENAI_MEAN, OPENAI_STD
from zsadcli.errors import BadInput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Datasets on which the authors' test script runs Crane+ with soft_mean on (DAGM, medical sets);
# names compared lower-case with non-alphanumerics removed (cvc-colondb == cvccolondb).
_MEDICAL = {"headct", "brainmri", "br35h", "covid", "covid19", "chest", "isic", "skin", "clinicdb", "cvcclinicdb",
            "colondb", "cvccolondb", "kvasir", "endo", "endotect", "tn3k", "thyroid"}


def _canonical(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", Path(str(name)).name.lower())


def is_medical(dataset: str) -> bool:
    return _canonical(dataset) in _MEDICAL


def is_dagm(dataset: str) -> bool:
    return _canonical(dataset).startswith("dagm")


# ---------------------------------------------------------------------- DINOv2 (Crane+)
def dinov2_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2 keys (``register_tokens``, CLS position inside ``pos_embed``) ->
    timm's no-embed-class layout (``reg_token``; the CLS position folded into ``cls_token``,
    which is what the hub model adds at run time). ``mask_token`` is dropped."""
    out = {k: v for k, v in state.items() if k not in ("mask_token", "register_tokens", "cls_token", "pos_embed")}
    out["reg_token"] = state["register_tokens"]
    out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    out["pos_embed"] = state["pos_embed"][:, 1:]
    return out


class DinoFeatures(nn.Module):
    """A frozen DINOv2 ViT with registers, on timm's ``VisionTransformer`` (the architecture of
    ``vit_base_patch14_reg4_dinov2``; timm is an open_clip dependency). Dimensions are read
    from the tensors; heads = width / 64 as in every DINOv2 ViT.

    ``forward`` takes the CLIP-normalised batch and returns what Crane reads from torch.hub's
    ``get_intermediate_layers(x, reshape=True)[0]``: the last block's tokens after the final
    norm, CLS and registers dropped, (B, C, H/14, W/14). The input is un-normalised, clamped to
    [0, 1] and ImageNet-normalised first. Off the native grid the position grid is resized as
    the hub's register models do (bicubic, antialiased).
    """

    def __init__(self, state: dict[str, torch.Tensor], source: str) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        state = {k: v.float() for k, v in state.items() if isinstance(v, torch.Tensor)}
        if "register_tokens" in state:
            state = dinov2_to_timm(state)
        need = ("patch_embed.proj.weight", "pos_embed", "cls_token", "reg_token", "norm.weight", "blocks.0.mlp.fc1.weight")
        missing = [k for k in need if k not in state]
        if missing:
            raise BadInput(f"{source} is not a DINOv2 ViT with registers (facebookresearch or timm key names): "
                           f"missing {', '.join(missing[:3])}.",
                           hint="pass dinov2_vitb14_reg4_pretrain.pth or timm's vit_base_patch14_reg4_dinov2 weights")
        width, _, patch, _ = state["patch_embed.proj.weight"].shape
        grid = round(state["pos_embed"].shape[1] ** 0.5)
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        self.patch_size = int(patch)
        with torch.device("meta"):
            model = VisionTransformer(
                img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth,
                num_heads=max(1, width // 64), mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width,
                init_values=1.0, reg_tokens=state["reg_token"].shape[1], no_embed_class=True,
                num_classes=0, dynamic_img_size=True)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise BadInput(f"{source} does not fit a DINOv2 ViT built from its own shapes: {str(exc)[:300]}") from None
        self.model = model.eval().requires_grad_(False)
        self.width = int(width)
        self._position_cache: dict[tuple, torch.Tensor] = {}
        self.register_buffer("_clip_mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_clip_std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_imnet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_imnet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "DinoFeatures":
        return super().train(False)  # frozen

    def forward(self, clip_images: torch.Tensor) -> torch.Tensor:
        x = (clip_images * self._clip_std + self._clip_mean).clamp(0, 1)
        x = (x - self._imnet_mean) / self._imnet_std
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        positions = self._positions(grid_h, grid_w)
        if capturing():
            tokens = self._features_with_positions(x.to(self.model.cls_token.dtype), positions)
        else:
            tokens = self.model.forward_features(x.to(self.model.cls_token.dtype))  # final norm included
        tokens = tokens[:, self.model.num_prefix_tokens:]
        return tokens.reshape(x.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()  # as the hub returns it


    def _positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position grid timm resamples for this input size (bicubic, antialiased), computed
        once per size: an exported graph takes it as a constant."""
        pos = self.model.pos_embed
        key = (grid_h, grid_w, pos.dtype, pos.device)
        cache = self._position_cache
        if key not in cache:
            from timm.layers import resample_abs_pos_embed

            with torch.no_grad():
                cache.clear()
                cache[key] = resample_abs_pos_embed(pos, new_size=[grid_h, grid_w],
                                                    old_size=list(self.model.patch_embed.grid_size), num_prefix_tokens=0)
        return cache[key]

    def _features_with_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` (no-embed-class layout: positions added to the patches, then
        CLS and registers prepended) with ``positions`` given instead of resampled inside."""
        model = self.model
        x = model.patch_embed(x)  # (B, H, W, C) with dynamic_img_size
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + positions
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), model.reg_token.expand(x.shape[0], -1, -1), x],
                      dim=1)
        x = model.norm_pre(model.patch_drop(model.pos_drop(x)))
        return model.norm(model.blocks(x))


def read_dino_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise BadInput(f"DINOv2 file {path} does not exist.", hint="check the path given to --dino-file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInput(f"DINOv2 file {path} cannot be read as safetensors or a weights-only torch file "
                       f"({type(exc).__name__}: {str(exc)[:160]}).") from None
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BadInput(f"DINOv2 file {path} holds a {type(state).__name__}, not a state dict.")
    return state


# ---------------------------------------------------------------------- the method
@register_method
class Crane(Method):
    name = "crane"
    description = "E-Attn (qq+kk+vv) dual path, context-guided prompts, score-based pooling (Crane)"
    use_dattn = False
    defaults: dict[str, Any] = {
        "image_size": 518, "n_ctx": 12, "deep_depth": 9, "deep_len": 4, "fp16_deep_prompts": True,
        "eattn_blocks": 19,          # replace_with_EAttn(to_layer=20): the last 19 blocks (6-24)
        "attn_type": "qq+kk+vv",
        "layers": (6, 12, 18, 24),
        "alias_layers": True,        # the official in-place aliasing: every E-Attn layer = the last
        "temperature": 0.07, "train_image_temperature": 0.01,
        "soft_mean": None,           # None: the authors' per-dataset choice
        "sbp_alpha": 0.5, "sigma": 4.0,
        "context_prob_train": 1.0, "context_prob_test": 0.0,
        "train_interpolation": "nearest",
        "focal_weight": 2.0, "dice_weight": 2.0, "image_weight": 0.2,
    }
    ablations = {
        "no-eattn": "plain attention everywhere: patch tokens from the original path",
        "no-sbp": "no score-based pooling: the image score from the global feature alone",
        "soft-mean-on": "soft mean on (softmax per patch set, then the mean)",
        "soft-mean-off": "soft mean off (mean of the logits, then softmax)",
        "no-smoothing": "no Gaussian smoothing of the map",
    }
    recipe = TrainRecipe(epochs=5, batch_size=8, lr=1e-3, betas=(0.6, 0.999), seed=111)
    released = {"visa": "crane-trained-on-visa", "mvtec": "crane-trained-on-mvtec"}

    def __init__(self, backbone, hparams=None, ablate=frozenset()) -> None:
        super().__init__(backbone, hparams, ablate)
        hp = self.hparams
        if {"soft-mean-on", "soft-mean-off"} <= self.ablate:
            raise BadInput("soft-mean-on and soft-mean-off exclude each other.")
        if hp["attn_type"] not in ALT_ATTENTIONS:
            raise BadInput(f"attn_type {hp['attn_type']!r} is not one of {', '.join(ALT_ATTENTIONS)}.")
        if self.use_dattn and hp["dattn_mean"] not in ("image", "batch"):
            raise BadInput(f"dattn_mean {hp['dattn_mean']!r}: use image (per-image mean) or batch (the authors').")
        if hp["train_interpolation"] not in ("nearest", "bilinear"):
            raise BadInput("train_interpolation: use nearest or bilinear.")
        self.prompts = ObjectAgnosticPrompts(backbone, n_ctx=int(hp["n_ctx"]), deep_depth=int(hp["deep_depth"]),
                                             deep_len=int(hp["deep_len"]))
        depth = backbone.vision_layers
        self.layers = tuple(self._layer(int(l)) for l in hp["layers"])
        if not self.layers:
            raise BadInput("layers: give at least one layer.")
        start = max(1, depth - int(hp["eattn_blocks"]) + 1) if depth >= int(hp["eattn_blocks"]) else \
            max(1, round(6 * depth / 24))
        self.dual = None if "no-eattn" in self.ablate else DualPath(start=start, attention=str(hp["attn_type"]))
        self.dattn = self.use_dattn and "no-dattn" not in self.ablate
        self.dino: DinoFeatures | None = self._load_dino() if self.dattn else None
        if self.dattn and min(self.layers) < 2:
            raise BadInput("D-Attn needs layers >= 2 (it reads a block's input).")
        self._dataset: str | None = None

    def _layer(self, layer: int) -> int:
        """The official layer numbers are literal (written for 24 blocks); on shallower backbones,
        where the official code cannot run, they scale with the depth."""
        depth = self.backbone.vision_layers
        if 1 <= layer <= depth:
            return layer
        return max(1, min(depth, round(layer * depth / 24)))

    def _load_dino(self) -> DinoFeatures | None:
        return None  # Crane has no D-Attn (Crane+ overrides this)

    # ------------------------------------------------------------------ settings
    def set_dataset(self, name: str) -> None:
        self._dataset = name

    @property
    def soft_mean(self) -> bool:
        if "soft-mean-on" in self.ablate:
            return True
        if "soft-mean-off" in self.ablate:
            return False
        if self.hparams["soft_mean"] is not None:
            return bool(self.hparams["soft_mean"])
        return self.default_soft_mean(self._dataset)

    @classmethod
    def default_soft_mean(cls, dataset: str | None) -> bool:
        """test.sh: ``--soft_mean True`` for every Crane run."""
        return True

    # ------------------------------------------------------------------ vision
    def _vision(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """(global feature (B, E), patch sets [(B, N, E)], grid), all L2-normalised."""
        bb = self.backbone
        depth = bb.vision_layers
        dual = self.dual
        dattn_layers = set(self.layers) if self.dattn else set()
        stop = min(dattn_layers) - 1 if dattn_layers else depth
        feats = bb.forward_image(images, taps={l for l in self.layers if l <= stop} | {stop}, dual=dual,
                                 pos_mode=self.position_interpolation, stop_after=stop)
        taps, alt_taps = dict(feats.taps), dict(feats.alt_taps)
        x, alt = feats.tokens, alt_taps.get(stop)
        dattn_input: dict[int, torch.Tensor] = {}
        blocks = bb.visual.transformer.resblocks
        for index in range(stop + 1, depth + 1):  # past the first D-Attn layer: the loop of forward_image,
            block = blocks[index - 1]             # plus the state each D-Attn layer reads
            if dual is not None and index >= dual.start:
                record: dict[str, torch.Tensor] = {}
                x, alt = dual_block(block, x, alt, dual, post_attn=record)
                if index in dattn_layers:
                    # the official block updates its inputs in place before D-Attn reads them:
                    # the first dual block's input becomes the E-Attn stream, later blocks' the
                    # original stream after attention (before the MLP)
                    dattn_input[index] = alt if index == dual.start else record["original"]
            else:
                if index in dattn_layers:
                    dattn_input[index] = x
                x = block(x)
            if index in self.layers:
                taps[index] = x
                if alt is not None:
                    alt_taps[index] = alt
        global_feature = F.normalize(bb.global_feature(x, ln_post=True).float(), dim=-1)
        dino = self.dino(images) if dattn_layers else None
        sets = []
        for layer in self.layers:
            if layer in dattn_layers:
                sets.append(self._dattn(blocks[layer - 1], dattn_input[layer], dino, feats.grid))
            if dual is not None and layer >= dual.start:
                tokens = alt if self.hparams["alias_layers"] else alt_taps[layer]
            else:
                tokens = taps[layer]
            sets.append(bb.project(tokens[:, 1:]))
        sets = [F.normalize(s.float(), dim=-1) for s in sets]
        return global_feature, sets, feats.grid

    def _dattn(self, block: nn.Module, layer_input: torch.Tensor, dino: torch.Tensor, grid: int) -> torch.Tensor:
        """D-Attn tokens (B, H*W, E) before normalisation: out_proj(A V) -> ln_post -> proj."""
        hp = self.hparams
        attn = block.attn
        width = layer_input.shape[-1]
        h = block.ln_1(layer_input)
        v = F.linear(h, attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])[:, 1:]  # CLS dropped
        batch, _, dh, dw = dino.shape
        if (dh, dw) != (grid, grid):
            v = F.interpolate(v.reshape(batch, grid, grid, width).permute(0, 3, 1, 2), size=(dh, dw),
                              mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(batch, dh * dw, width)
        f = F.normalize(dino.flatten(2).float(), dim=1)
        sim = torch.einsum("bcm,bcn->bmn", f, f)
        if hp["dattn_mean"] == "batch":
            mean = sim.mean()
        else:  # the mean of each image's own Gram matrix (= the official one at batch 1)
            mean = sim.mean(dim=(1, 2), keepdim=True)
        sim = (sim - mean * float(hp["dattn_beta"])) * float(hp["dattn_gamma"])
        negative = sim < 0
        # A row is fully masked only when beta * mean >= 1 (not even the diagonal survives); the
        # official code returns NaN there. Such rows keep their unmasked weights instead.
        negative &= ~negative.all(dim=-1, keepdim=True)
        sim = sim.masked_fill(negative, float("-inf"))
        weights = sim.to(v.dtype).softmax(dim=-1)  # the same weights for every head
        out = F.linear(weights @ v, attn.out_proj.weight, attn.out_proj.bias)
        return self.backbone.project(out)

    # ------------------------------------------------------------------ text
    def _deep(self) -> list[torch.Tensor]:
        deep = list(self.prompts.compound_prompts_text)
        if self.hparams["fp16_deep_prompts"]:
            deep = [p.half().to(p.dtype) for p in deep]  # the official insertion casts with .half()
        return deep

    def static_text(self) -> torch.Tensor:
        """(1, 2, E) L2-normalised [normal, anomalous]; computed once per model outside training."""
        return self.cached("text", self._compute_static_text)

    def _compute_static_text(self) -> torch.Tensor:
        embeddings, ids, _ = self.prompts()
        features = self.backbone.encode_text_embeddings(embeddings, ids.argmax(dim=-1), self._deep()).float()
        return F.normalize(features, dim=-1)[None]

    def context_text(self, image_embedding: torch.Tensor) -> torch.Tensor:
        """(B, 2, E): each image's L2-normalised global feature used as one token after the
        context ("pad_suffix"): the last padding token is dropped and the token ids repeat the
        id at the insertion point, so the end-of-text position moves by one."""
        width = self.backbone.arch.text_width
        if image_embedding.shape[-1] != width:
            raise BadInput(f"context-guided prompts put the {image_embedding.shape[-1]}-d image feature into the "
                           f"{width}-d text tokens: this backbone's embed dim differs from its text width.",
                           hint="use a backbone whose embed dim equals its text width (as ViT-L/14), or "
                                "--hparam context_prob_train=0 (and context_prob_test=0)")
        batch = image_embedding.shape[0]
        token = image_embedding[:, None].to(self.prompts.ctx_pos.dtype)
        embeddings, eot = [], []
        for state in STATES:
            prefix = getattr(self.prompts, f"token_prefix_{state}")[0, 0]
            ctx = getattr(self.prompts, f"ctx_{state}")[0, 0]
            suffix = getattr(self.prompts, f"token_suffix_{state}")[0, 0]
            ids = getattr(self.prompts, f"tokenized_prompts_{state}")[0, 0]
            insert = prefix.shape[0] + ctx.shape[0] + 1
            embeddings.append(torch.cat([prefix.expand(batch, -1, -1), ctx.expand(batch, -1, -1), token,
                                         suffix[:-1].expand(batch, -1, -1)], dim=1))
            shifted = torch.cat([ids[:insert], ids[insert:insert + 1], ids[insert:]])[:-1]
            eot.append(shifted.argmax().expand(batch))
        features = self.backbone.encode_text_embeddings(torch.cat(embeddings), torch.cat(eot), self._deep()).float()
        features = F.normalize(features, dim=-1)
        return features.view(2, batch, -1).transpose(0, 1)

    def export_blockers(self) -> list[str]:
        prob = float(self.hparams["context_prob_test"])
        if 0 < prob < 1:
            return [f"context-guided prompts drawn at random per call (context_prob_test={prob:g}); a graph "
                    "needs 0 (static prompts) or 1 (always per image)"]
        return []

    def text_features(self, image_embedding: torch.Tensor) -> torch.Tensor:
        prob = float(self.hparams["context_prob_train" if self.training else "context_prob_test"])
        if prob > 0:
            use_context = True if prob >= 1 else bool(torch.rand(1).item() <= prob)
            if use_context:
                return self.context_text(image_embedding)
        return self.static_text()


    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> MethodOutput:
        hp = self.hparams
        size = images.shape[-1]
        with torch.no_grad():  # the backbone (and DINOv2) are frozen; only the text side learns
            global_feature, sets, grid = self._vision(images)
        text = self.text_features(global_feature)  # (1 or B, 2, E)
        temperature = float(hp["temperature"])
        logits = [(tokens @ text.transpose(1, 2)) / temperature for tokens in sets]  # (B, N, 2) each
        batch = images.shape[0]

        def regrid(values: torch.Tensor, mode: str) -> torch.Tensor:  # (B, N, 2) -> (B, S, S, 2)
            values = values.reshape(batch, grid, grid, -1).permute(0, 3, 1, 2)
            return F.interpolate(values, (size, size), mode=mode).permute(0, 2, 3, 1)

        image_feature = global_feature
        if "no-sbp" not in self.ablate:
            weights = torch.stack(logits, dim=1).mean(dim=1).softmax(dim=-1)[..., 1:]  # (B, N, 1)
            pooled = F.normalize((torch.stack(sets).mean(dim=0) * weights).sum(dim=1), dim=1)
            alpha = float(hp["sbp_alpha"])
            image_feature = F.normalize(alpha * pooled + (1 - alpha) * global_feature, dim=1)
        image_temperature = float(hp["train_image_temperature"]) if self.training else temperature
        image_logits = (image_feature[:, None] @ text.transpose(1, 2)).squeeze(1) / image_temperature
        image_score = image_logits.softmax(dim=-1)[:, 1]
        extras: dict[str, Any] = {"image_logits": image_logits}
        if self.training:
            mode = str(hp["train_interpolation"])
            prob_maps = [regrid(l.softmax(dim=-1), mode).permute(0, 3, 1, 2) for l in logits]  # (B, 2, S, S)
            extras["prob_maps"] = prob_maps
            anomaly = torch.stack([p[:, 1] for p in prob_maps]).mean(dim=0).detach()
        else:
            if self.soft_mean:
                score_map = torch.stack([regrid(l.softmax(dim=-1), "bilinear") for l in logits]).mean(dim=0)
            else:
                score_map = torch.stack([regrid(l, "bilinear") for l in logits]).mean(dim=0).softmax(dim=-1)
            anomaly = score_map[..., 1]
            if "no-smoothing" not in self.ablate:
                anomaly = gaussian_smooth(anomaly.detach(), float(hp["sigma"])).to(anomaly.device)
        return MethodOutput(image_score=image_score, anomaly_map=anomaly, extras=extras)

    def loss(self, output: MethodOutput, masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """2 x sum over patch sets Focal + 2 x sum Dice((1 - S_n + S_a) / 2) + 0.2 x CE(image logits / 0.01)."""
        hp = self.hparams
        gt = masks.float()
        maps = output.extras["prob_maps"]
        focal = sum(focal_loss(p, gt) for p in maps)
        dice = sum(dice_loss((1 - p[:, 0] + p[:, 1]) / 2, gt) for p in maps)
        image = F.cross_entropy(output.extras["image_logits"], labels.long())
        focal, dice = float(hp["focal_weight"]) * focal, float(hp["dice_weight"]) * dice
        total = focal + dice + float(hp["image_weight"]) * image
        return total, {"focal": float(focal.detach()), "dice": float(dice.detach()), "image": float(image.detach())}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The prompt learner only (the frozen CLIP and DINOv2 are not part of a checkpoint)."""
        return {f"prompts.{k}": v for k, v in self.prompts.state_dict().items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.checkpoint_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise BadInput(f"checkpoint tensors do not fit {self.name}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}.")
        self._load_prompts({k[len("prompts."):]: v for k, v in state.items()})

    def _load_prompts(self, state: dict[str, torch.Tensor]) -> None:
        self.load_module_state(self.prompts, state, f"{self.name} prompt learner")
        self.invalidate_caches()

    @classmethod
    def authors_checkpoint_hparams(cls, obj: Any) -> dict[str, Any] | None:
        """``{"prompt_learner": {...}}`` without projection layers (AnomalyCLIP's files carry them)."""
        state = obj.get("prompt_learner") if isinstance(obj, dict) else None
        if (not isinstance(state, dict) or "ctx_pos" not in state or len(obj) != 1
                or any(k.startswith("compound_prompt_projections.") for k in state)):
            return None
        return ObjectAgnosticPrompts.hparams_from_state(state)

    def import_authors_checkpoint(self, obj: Any) -> None:
        """Loaded strictly, as the official test does; the stored token buffers define the prompts."""
        self._load_prompts(dict(obj["prompt_learner"]))


@register_method
class CranePlus(Crane):
    name = "crane+"
    description = "Crane with D-Attn from DINOv2 ViT-B/14-reg4 feature similarity (Crane+)"
    use_dattn = True
    defaults: dict[str, Any] = {
        **Crane.defaults,
        "layers": (24,),
        "dattn_beta": 1.2, "dattn_gamma": 3.0,
        "dattn_mean": "image",       # "batch": the official batch-wide mean
        "dino_file": None,           # a local facebookresearch- or timm-format file
        "dino_weights": "dinov2-vitb14-reg4",  # weights.yaml key used without dino_file
    }
    ablations = {**Crane.ablations, "no-dattn": "no D-Attn: E-Attn patch tokens only"}
    released = {"visa": "cranep-trained-on-visa", "mvtec": "cranep-trained-on-mvtec",
                "mvtec-epoch1": "cranep-trained-on-mvtec-epoch1", "visa-epoch1": "cranep-trained-on-visa-epoch1"}

    def _load_dino(self) -> DinoFeatures:
        path = self.hparams["dino_file"]
        if path:
            return DinoFeatures(read_dino_state(path), str(path))
        from safetensors.torch import load_file

        from zsadcli.core import hub

        key = str(self.hparams["dino_weights"])
        _, resolved = hub.resolve_key(key, section="auxiliary")
        return DinoFeatures(load_file(str(resolved)), f"{key} ({resolved})")

    @classmethod
    def default_soft_mean(cls, dataset: str | None) -> bool:
        """test.sh: Crane+ with soft mean only on DAGM and the medical sets."""
        return bool(dataset) and (is_dagm(dataset) or is_medical(dataset))

    @classmethod
    def protocol_train_on(cls, test_dataset: str) -> str | None:
        """MVTec AD with the VisA-trained model; the medical sets with the MVTec-trained epoch-1
        model (the authors' test script); every other set with the MVTec-trained epoch-5 model."""
        if is_medical(test_dataset):
            return "mvtec-epoch1"
        return super().protocol_train_on(test_dataset)
