"""ViP²-CLIP (Yang et al., arXiv 2505.17692), as kim0806/ViP2-CLIP computes it.

- Vision: plain CLIP (no attention surgery). Patch tokens = the residual stream after blocks
  6/12/18/24, each through ``ln_post`` and ``proj``, L2-normalised, CLS dropped. Global
  feature g = the last block's CLS @ proj *without* ``ln_post``, L2-normalised.
- ICA (image-conditioned adapter, the authors' ``prompt_learner``): per state a prompt
  ``[SOS][7 learnable ctx][state word][z_1 z_2 z_3][EOT]`` with ``z_i = cls_ctx_i + MLP_i(g + b)``
  (three 768->384->768 ReLU MLPs), so the prompts differ per image; the text tower runs once on
  the 2 x batch sequences. Official quirk kept: the *normal* prompt's fixed embeddings come from
  the anomalous tokenisation (its state word is "damaged"); the released files store those
  buffers. ``fix_normal_prompt`` (``--fix-normal-prompt``) puts "good" there instead.
- FGP (fine-grained perception, the authors' ``Zero_try``): one 8-head cross-attention shared by
  all layers; queries from the two text embeddings, keys/values from the layer's patch tokens,
  1x1-convolution projections with biases, *unscaled* logits, softmax over patches, output
  projection, L2. Its output replaces the text embeddings for that layer.
- UTPA: per layer S = softmax(cos / 0.07); map = mean over layers of (S_a + 1 - S_n) / 2
  (bilinear upsampling first), Gaussian sigma 8; image score = softmax(mean of the raw cosine
  pairs of each layer's top-50 patches by S_a, / 0.07)[anomalous].

The official code fixes the text width and embedding size at 768; here those sizes follow the
backbone (identical for ViT-L/14), so any OpenAI-format CLIP works.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zsadcli.core.backbone import ClipBackbone
from zsadcli.core.losses import dice_loss, focal_loss
from zsadcli.core.methods import register_method
from zsadcli.core.methods.base import Method, MethodOutput, TrainRecipe
from zsadcli.core.postprocess import gaussian_smooth, upsample
from zsadcli.errors import BadInput

STATES = ("pos", "neg")  # normal, anomalous (the authors' names)
STATE_WORDS = {"pos": "good", "neg": "damaged"}


class ImageTokenNet(nn.Module):
    """The meta-net (authors' ``cls_prompter``): ``n`` parallel MLPs over g + b -> (B, n, W)."""

    def __init__(self, dim_in: int, dim_out: int, n: int, hidden: int = 384, bias: bool = True,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if bias:
            self.bias = nn.Parameter(torch.empty(1, dim_in))
            nn.init.normal_(self.bias, std=init_std)
        else:
            self.bias = None
        self.fc = nn.ModuleList(nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, dim_out))
                                for _ in range(n))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        x = g if self.bias is None else g + self.bias
        return torch.stack([mlp(x) for mlp in self.fc], dim=1)


class ImageConditionedPrompts(nn.Module):
    """ViP-ICA with the authors' state-dict keys, so their checkpoints load as they are and the
    stored token buffers define the fixed part of the prompts ("buffers win")."""

    def __init__(self, backbone: ClipBackbone, *, n_ctx: int = 7, n_cls: int = 3, hidden: int = 384,
                 meta_bias: bool = True, fix_normal_prompt: bool = False, init_std: float = 0.02) -> None:
        super().__init__()
        width, embed = backbone.arch.text_width, backbone.arch.embed_dim
        self.n_ctx, self.n_cls = n_ctx, n_cls
        # Creation/initialisation order of the reference: cls_ctx, ctx_pos, ctx_neg, meta-net.
        self.cls_ctx = nn.Parameter(torch.empty(n_cls, width))
        self.ctx_pos = nn.Parameter(torch.empty(n_ctx, width))
        self.ctx_neg = nn.Parameter(torch.empty(n_ctx, width))
        for param in (self.cls_ctx, self.ctx_pos, self.ctx_neg):
            nn.init.normal_(param, std=init_std)
        self.cls_prompter = ImageTokenNet(embed, width, n_cls, hidden, bias=meta_bias, init_std=init_std)
        placeholder = lambda n: " ".join(["X"] * n)  # noqa: E731
        ids = {s: backbone.tokenize([f"{placeholder(n_ctx)} {STATE_WORDS[s]} {placeholder(n_cls)}"]).cpu()
               for s in STATES}
        with torch.no_grad():
            for s in STATES:
                # The quirk: the official normal prompt embeds the *anomalous* token ids.
                source = ids["pos"] if (s == "pos" and fix_normal_prompt) else ids["neg"]
                emb = backbone.token_embedding(source.to(backbone.device)).float().cpu()
                self.register_buffer(f"token_prefix_{s}", emb[:, :1].clone())
                self.register_buffer(f"token_middle_{s}", emb[:, 1 + n_ctx:2 + n_ctx].clone())
                self.register_buffer(f"token_suffix_{s}", emb[:, 2 + n_ctx + n_cls:].clone())
                self.register_buffer(f"tokenized_prompts_{s}", ids[s].int())

    def use_good_state_word(self, backbone: ClipBackbone) -> None:
        """Put the embedding of the normal prompt's own state word ("good") in its slot."""
        ids = self.tokenized_prompts_pos.to(backbone.device).long()
        with torch.no_grad():
            word = backbone.token_embedding(ids[:, 1 + self.n_ctx:2 + self.n_ctx])
            self.token_middle_pos.copy_(word.to(self.token_middle_pos))

    def forward(self, g: torch.Tensor, image_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """g (B, E) L2-normalised -> (embeddings (2B, L, W): the B normal prompts then the B
        anomalous ones; EOT positions (2B,))."""
        batch = g.shape[0]
        generic = self.cls_ctx.unsqueeze(0).expand(batch, -1, -1)
        if image_tokens:
            generic = generic + self.cls_prompter(g.to(self.cls_ctx.dtype))
        prompts, eot = [], []
        for s in STATES:
            fixed = [getattr(self, f"token_{part}_{s}").to(generic.dtype).expand(batch, -1, -1)
                     for part in ("prefix", "middle", "suffix")]
            ctx = getattr(self, f"ctx_{s}").unsqueeze(0).expand(batch, -1, -1)
            prompts.append(torch.cat([fixed[0], ctx, fixed[1], generic, fixed[2]], dim=1))
            eot.append(getattr(self, f"tokenized_prompts_{s}").argmax(dim=-1).expand(batch))
        return torch.cat(prompts), torch.cat(eot)

    @staticmethod
    def hparams_from_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"n_ctx": int(state["ctx_pos"].shape[0]), "n_cls": int(state["cls_ctx"].shape[0]),
                "mlp_hidden": int(state["cls_prompter.fc.0.0.weight"].shape[0]),
                "meta_bias": "cls_prompter.bias" in state}


class FineGrainedPerception(nn.Module):
    """ViP-FGP with the authors' keys: text queries attend over a layer's patch tokens.

    The projections are 1x1 convolutions in the authors' file (weights (C, C, 1)); a 1x1
    convolution over tokens is a linear map, applied here as one in (B, N, C) layout.
    """

    def __init__(self, dim: int, heads: int = 8) -> None:
        super().__init__()
        if dim % heads:
            raise BadInput(f"FGP needs an embedding size divisible by {heads} heads (got {dim}).")
        self.heads = heads
        self.q_proj_pre = nn.Conv1d(dim, dim, kernel_size=1)
        self.k_proj_pre_1 = nn.Conv1d(dim, dim, kernel_size=1)
        self.v_proj_pre_1 = nn.Conv1d(dim, dim, kernel_size=1)
        self.proj_post_t = nn.Conv1d(dim, dim, kernel_size=1)
        # Stored and trained by the official code but never used in its forward.
        self.prompt_temp_l1 = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float32))

    @staticmethod
    def _project(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, conv.weight[..., 0], conv.bias)

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """text (B, T, C), patches (B, N, C) -> refined text (B, T, C), L2-normalised."""
        batch, n_text, dim = text.shape
        d = dim // self.heads
        q = self._project(self.q_proj_pre, text).reshape(batch, n_text, self.heads, d)
        k = self._project(self.k_proj_pre_1, patches).reshape(batch, -1, self.heads, d)
        v = self._project(self.v_proj_pre_1, patches).reshape(batch, -1, self.heads, d)
        attn = torch.einsum("bthd,bnhd->bhtn", q, k).softmax(dim=-1)  # no 1/sqrt(d): beta_t = 1
        out = torch.einsum("bhtn,bnhd->bthd", attn, v).reshape(batch, n_text, dim)
        return F.normalize(self._project(self.proj_post_t, out), dim=-1)


@register_method
class ViP2CLIP(Method):
    name = "vip2clip"
    description = "image-conditioned prompts (ICA) + fine-grained perception (FGP) + top-k alignment"
    defaults: dict[str, Any] = {
        "image_size": 518, "n_ctx": 7, "n_cls": 3, "mlp_hidden": 384, "meta_bias": True, "fgp_heads": 8,
        "layers": (6, 12, 18, 24), "topk": 50, "temperature": 0.07, "sigma": 8.0,
        "image_tokens": True, "fgp": True, "fix_normal_prompt": False, "fgp_lr_scale": 0.01,
    }
    # each switch stands for a hyperparameter value (one source of truth: the hyperparameters)
    ablations = {
        "no-image-tokens": "ICA without image tokens: the generic tokens are the learned cls_ctx alone",
        "no-fgp": "no FGP: the plain text embeddings score every layer",
        "fix-normal-prompt": "normal prompt says 'good' (the official one says 'damaged'); = --fix-normal-prompt",
        "last-layer": "map and score from layer 24 only (= --hparam layers=[24])",
        "no-smoothing": "no Gaussian smoothing of the map (= --hparam sigma=0)",
    }
    _ABLATION_HPARAMS = {"no-image-tokens": {"image_tokens": False}, "no-fgp": {"fgp": False},
                         "fix-normal-prompt": {"fix_normal_prompt": True}, "last-layer": {"layers": (24,)},
                         "no-smoothing": {"sigma": 0.0}}
    recipe = TrainRecipe(epochs=10, batch_size=8, lr=1e-3, betas=(0.9, 0.999), seed=111)
    released = {"visa": "vip2clip-trained-on-visa", "mvtec": "vip2clip-trained-on-mvtec"}

    def __init__(self, backbone, hparams=None, ablate=frozenset()) -> None:
        super().__init__(backbone, hparams, ablate)
        for switch in sorted(self.ablate):
            self.hparams.update(self._ABLATION_HPARAMS[switch])
        hp = self.hparams
        self.ica = ImageConditionedPrompts(backbone, n_ctx=int(hp["n_ctx"]), n_cls=int(hp["n_cls"]),
                                           hidden=int(hp["mlp_hidden"]), meta_bias=bool(hp["meta_bias"]),
                                           fix_normal_prompt=bool(hp["fix_normal_prompt"]))
        self.fgp = FineGrainedPerception(backbone.arch.embed_dim, heads=int(hp["fgp_heads"]))
        self.layers = tuple(self._depth_relative(int(l)) for l in hp["layers"])
        if not self.layers:
            raise BadInput("vip2clip needs at least one layer (hparam layers).")

    def _depth_relative(self, layer: int) -> int:
        """Layer numbers are written for 24-block ViT-L/14; map them onto other depths."""
        depth = self.backbone.vision_layers
        return layer if depth == 24 else max(1, round(layer * depth / 24))

    # ------------------------------------------------------------------ text
    def text_features(self, g: torch.Tensor) -> torch.Tensor:
        """(B, 2, E) L2-normalised [normal, anomalous] per image. Without image tokens the
        prompts are static and computed once (outside training)."""
        if bool(self.hparams["image_tokens"]):
            return self._encode_prompts(g, image_tokens=True)
        static = self.cached("text", lambda: self._encode_prompts(g[:1], image_tokens=False))
        return static.expand(g.shape[0], -1, -1)

    def _encode_prompts(self, g: torch.Tensor, *, image_tokens: bool) -> torch.Tensor:
        prompts, eot = self.ica(g, image_tokens=image_tokens)
        features = self.backbone.encode_text_embeddings(prompts, eot).float()
        return F.normalize(features.unflatten(0, (2, -1)).transpose(0, 1), dim=-1)  # [normal, anomalous] per image

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> MethodOutput:
        temperature = float(self.hparams["temperature"])
        size = images.shape[-1]
        with torch.no_grad():  # the backbone is frozen; ICA and FGP learn
            feats = self.backbone.forward_image(images, taps=self.layers, pos_mode=self.position_interpolation)
            g = F.normalize(self.backbone.global_feature(feats.tokens, ln_post=False).float(), dim=-1)
            # (L, B, N, E): every used layer's patch tokens, CLS dropped
            patches = F.normalize(torch.stack([self.backbone.project(feats.taps[l][:, 1:])
                                               for l in self.layers]).float(), dim=-1)
        n_layers, batch, n_patches, dim = patches.shape
        text = self.text_features(g)  # (B, 2, E)
        if self.hparams["fgp"]:
            fgp_dtype = self.fgp.q_proj_pre.weight.dtype
            refined = self.fgp(text.to(fgp_dtype).repeat(n_layers, 1, 1),
                               patches.reshape(n_layers * batch, n_patches, dim).to(fgp_dtype)).float()
            refined = refined.reshape(n_layers, batch, 2, dim)
        else:
            refined = text.unsqueeze(0).expand(n_layers, -1, -1, -1)
        cosines = patches @ refined.transpose(-1, -2)  # (L, B, N, 2)
        probs = (cosines / temperature).softmax(dim=-1)

        grid = feats.grid
        prob_maps = upsample(probs.reshape(n_layers * batch, grid, grid, 2).permute(0, 3, 1, 2), size)
        prob_maps = prob_maps.reshape(n_layers, batch, 2, size, size)
        anomaly = ((prob_maps[:, :, 1] + 1 - prob_maps[:, :, 0]) / 2).mean(dim=0)

        k = min(int(self.hparams["topk"]), n_patches)
        top = probs[..., 1].topk(k, dim=-1).indices  # (L, B, k)
        picked = cosines.gather(2, top.unsqueeze(-1).expand(-1, -1, -1, 2))  # raw cosine pairs
        image_logits = picked.permute(1, 0, 2, 3).reshape(batch, n_layers * k, 2).mean(dim=1) / temperature
        image_score = image_logits.softmax(dim=-1)[:, 1]

        sigma = float(self.hparams["sigma"])
        if sigma > 0 and not self.training:  # the loss reads the unsmoothed per-layer maps
            anomaly = gaussian_smooth(anomaly.detach(), sigma).to(anomaly.device)
        return MethodOutput(image_score=image_score, anomaly_map=anomaly,
                            extras={"image_logits": image_logits, "prob_maps": list(prob_maps)})

    def loss(self, output: MethodOutput, masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Sum over layers of (focal + dice(S_a, gt) + dice(S_n, 1 - gt)) + CE(top-k image logits)."""
        gt = masks.float()
        image_loss = F.cross_entropy(output.extras["image_logits"], labels.long())
        map_loss = sum(focal_loss(p, gt) + dice_loss(p[:, 1], gt) + dice_loss(p[:, 0], 1 - gt)
                       for p in output.extras["prob_maps"])
        return map_loss + image_loss, {"map": float(map_loss.detach()), "image": float(image_loss.detach())}

    def make_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        """Adam with two groups: ICA at lr, FGP at lr x 0.01 (1e-3 and 1e-5 in the recipe)."""
        assert self.recipe is not None
        lr = self.recipe.lr if lr is None else lr
        groups = [{"params": [p for p in self.ica.parameters() if p.requires_grad], "lr": lr},
                  {"params": [p for p in self.fgp.parameters() if p.requires_grad],
                   "lr": lr * float(self.hparams["fgp_lr_scale"])}]
        return torch.optim.Adam(groups, lr=lr, betas=self.recipe.betas)

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_checkpoint_state(state)
        if self.hparams["fix_normal_prompt"]:
            self.ica.use_good_state_word(self.backbone)

    @classmethod
    def authors_checkpoint_hparams(cls, obj: Any) -> dict[str, Any] | None:
        if not isinstance(obj, dict) or set(obj) != {"prompt_learner", "Zero_try"}:
            return None
        ica, fgp = obj["prompt_learner"], obj["Zero_try"]
        if not (isinstance(ica, dict) and isinstance(fgp, dict)):
            return None
        needed_ica = ("cls_ctx", "ctx_pos", "ctx_neg", "cls_prompter.fc.0.0.weight")
        if any(k not in ica for k in needed_ica) or "q_proj_pre.weight" not in fgp:
            return None
        return ImageConditionedPrompts.hparams_from_state(ica)

    def import_authors_checkpoint(self, obj: Any) -> None:
        """``{"prompt_learner": ICA state with its token buffers, "Zero_try": FGP state}``; the
        stored buffers replace the ones built from our tokenizer (so the quirk comes with them)."""
        for module, key in ((self.ica, "prompt_learner"), (self.fgp, "Zero_try")):
            self.load_module_state(module, obj[key], f"ViP²-CLIP {type(module).__name__} ({key!r})")
        if self.hparams["fix_normal_prompt"]:
            self.ica.use_good_state_word(self.backbone)
        self.invalidate_caches()
