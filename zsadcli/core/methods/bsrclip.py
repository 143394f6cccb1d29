"""BSR-CLIP ("Background-Calibrated Structural Reasoning", ICMR), as IJCAI-LO/ICMR-BSR computes it.

Base model (AF-CLIP):
- Vision: the raw residual stream after blocks 6, 12, 18, 24 (all tokens, CLS included, before
  ``ln_post``); each layer aggregated over r x r neighbourhoods, r = 1, 3, 5, with a normalised
  2-D Gaussian (sigma 4) over the zero-padded 37 x 37 patch grid (no renormalisation at the
  border; CLS untouched) -> 12 token sets. One shared Adaptor (LayerNorm, 8 x 64 self-attention,
  no q/k/v bias, output projection; its output *replaces* the tokens), then ``ln_post`` and ``proj``.
- Text: "without defect." / "with defect." with one shared learnable 12-token prefix placed
  before SOS; the sequence is cut to the context length and the EOT index shifted by 12.
- Scores: cos / 0.07 logits averaged over the 12 sets, softmax over {normal, anomalous}; image
  score = the CLS token's anomaly probability; patch map = the patch tokens'.
BSR chain on the patch map (inference only; no stage changes the image score):
1. background calibration: beta from the map's compactness max/mean; base = 95th percentile of
   the patch anomaly *logits* over the background (map <= its 75th percentile), >= 0; the patch
   anomaly logits minus beta * base, softmax again;
2. RCS: head-averaged attention of ViT blocks 6-9, patch-to-patch, mean over blocks, top-128
   per row, + I, ^1.2, row-normalised -> A; P + 1.5 (A P - P);
3. SRR: clamp to [0, 1], soft gate sigmoid((x - q98) / 0.08) between x and its 19 x 19
   sigma-3 Gaussian blur (reflect padding).
Then bilinear upsampling to the input size and a Gaussian of sigma 2 (sigma 4 when RCS and SRR
are both off, as the official evaluation switches it).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zsadcli.core.checkpoints import PICKLE_STANDINS
from zsadcli.core.losses import focal_bce
from zsadcli.core.methods import register_method
from zsadcli.core.methods.base import Method, MethodOutput, TrainRecipe
from zsadcli.core.postprocess import gaussian_smooth, upsample
from zsadcli.errors import BadInput

STATE_PROMPTS = ("without defect.", "with defect.")  # normal, anomalous


# ---------------------------------------------------------------------- the Adaptor
class _SelfAttention(nn.Module):
    """Multi-head self-attention without q/k/v bias; attribute names as in the authors' Adaptor
    (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) so that their state dict loads as is."""

    def __init__(self, width: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_k = nn.Linear(width, inner, bias=False)
        self.to_v = nn.Linear(width, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class _AdaptorBlock(nn.Module):
    def __init__(self, width: int, heads: int, dim_head: int) -> None:
        super().__init__()
        # creation order as the authors' (attention first, then the norm): same draws from a seed
        self.attn = _SelfAttention(width, heads, dim_head)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm(x))  # no residual connection


class Adaptor(nn.Module):
    """LayerNorm -> self-attention -> output projection, applied to every token; state-dict keys
    ``attention.norm.*``, ``attention.attn.to_{q,k,v}.weight``, ``attention.attn.to_out.0.*``."""

    def __init__(self, width: int, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__()
        self.attention = _AdaptorBlock(width, heads, dim_head)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.attention(tokens)


class _AuthorsModule(nn.Module):
    """Stand-in for the classes the authors' pickled Adaptor names (``clip.adaptor.*``): unpickling
    restores its parameters and children; only ``state_dict()`` is used."""


for _name in ("Adaptor", "BasicTransformerBlock", "CrossAttention"):
    PICKLE_STANDINS[("clip.adaptor", _name)] = _AuthorsModule


# ---------------------------------------------------------------------- building blocks
def gaussian_kernel2d(size: int, sigma: float) -> torch.Tensor:
    """(size, size) exp(-(x^2 + y^2) / 2 sigma^2) on a centred grid, summing to 1."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))
    return kernel / kernel.sum()


def aggregate_neighbours(tokens: torch.Tensor, grid: int, kernel: torch.Tensor | None) -> torch.Tensor:
    """Each patch token replaced by the ``kernel``-weighted sum of its r x r neighbourhood on the
    zero-padded patch grid (weights not renormalised at the border); CLS (first) unchanged.
    A depthwise convolution (the kernel is symmetric, so correlation and convolution agree)."""
    if kernel is None:
        return tokens
    size = kernel.shape[0]
    batch, _, width = tokens.shape
    patches = tokens[:, 1:].reshape(batch, grid, grid, width).permute(0, 3, 1, 2)
    out = F.conv2d(patches, kernel.to(tokens).expand(width, 1, size, size), padding=size // 2, groups=width)
    return torch.cat([tokens[:, :1], out.flatten(2).transpose(1, 2)], dim=1)


def background_calibration(logits: torch.Tensor, probs: torch.Tensor, *, beta0: float, bg_quantile: float,
                           base_quantile: float, min_background: int = 16) -> torch.Tensor:
    """Calibrated patch anomaly probabilities (B, N) from patch logits (B, N, 2) [normal, anomalous]
    and the current patch map ``probs`` (B, N)."""
    compact = (probs.max(dim=1, keepdim=True).values / (probs.mean(dim=1, keepdim=True) + 1e-6)).clamp(1.0, 50.0)
    beta = (beta0 * (1.2 - 0.3 * ((compact - 3.0) / 7.0).clamp(0.0, 1.0))).clamp(0.45, 0.70)
    threshold = torch.quantile(probs, bg_quantile, dim=1, keepdim=True)
    anomalous = logits[..., 1]
    background = probs <= threshold
    count = background.sum(dim=1, keepdim=True)
    # torch.quantile of each row's background logits (linear interpolation between the sorted
    # values at floor/ceil of q (n - 1)), for all rows at once: the other logits sort last as +inf
    ranked = torch.where(background, anomalous, torch.full_like(anomalous, float("inf"))).sort(dim=1).values
    rank = base_quantile * (count - 1).clamp(min=0).to(anomalous.dtype)
    below, above = rank.floor().long(), rank.ceil().long()
    quantile = torch.lerp(ranked.gather(1, below), ranked.gather(1, above), rank - below.to(rank.dtype))
    base = torch.where(count < min_background, anomalous.mean(dim=1, keepdim=True), quantile).clamp(min=0.0)
    calibrated = torch.stack([logits[..., 0], anomalous - beta * base], dim=-1)
    return calibrated.softmax(dim=-1)[..., 1]


def attention_affinity(attn: list[torch.Tensor], *, topk: int, gamma: float, tau: float = 1.0,
                       add_identity: bool = True) -> torch.Tensor:
    """Row-stochastic patch affinity (B, N, N) from head-averaged attention maps (B, 1+N, 1+N):
    patch-to-patch block, mean over maps, top-k per row kept, + I, ^gamma, rows normalised."""
    total = None
    for a in attn:
        a = a[:, 1:, 1:]
        if tau != 1.0:
            a = (a / tau).softmax(dim=-1)
        total = a if total is None else total + a
    corr = total / len(attn)
    n = corr.shape[-1]
    values, index = torch.topk(corr, k=min(max(topk, 1), n), dim=-1)
    corr = torch.zeros_like(corr).scatter_(-1, index, values)
    if add_identity:
        corr = corr + torch.eye(n, dtype=corr.dtype, device=corr.device)
    if gamma != 1.0:
        corr = corr.clamp(min=0.0) ** gamma
    return corr / (corr.sum(dim=-1, keepdim=True) + 1e-6)


def _srr_kernel_size(sigma: float) -> int:
    size = int(max(3, 6 * sigma + 1))
    return size + 1 - size % 2


def soft_gated_refinement(maps: torch.Tensor, *, sigma: float, gate_quantile: float,
                          gate_temperature: float) -> torch.Tensor:
    """SRR on (B, H, W): x = clamp(map, 0, 1); gate = sigmoid((x - q) / T), q the per-image
    quantile; gate * blur(x) + (1 - gate) * x, blur a normalised Gaussian of size
    max(3, int(6 sigma + 1)) made odd, with torch's reflect padding."""
    x = maps.clamp(0.0, 1.0)
    batch = x.shape[0]
    threshold = torch.quantile(x.reshape(batch, -1), gate_quantile, dim=1).view(batch, 1, 1)
    gate = torch.sigmoid((x - threshold) / (gate_temperature + 1e-12))
    size = _srr_kernel_size(sigma)
    half = size // 2
    coords = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2 + 1e-12))
    g = g / (g.sum() + 1e-12)
    padded = F.pad(x[:, None], (half, half, half, half), mode="reflect")
    blurred = F.conv2d(F.conv2d(padded, g.view(1, 1, size, 1)), g.view(1, 1, 1, size))[:, 0]
    return gate * blurred + (1.0 - gate) * x


def patch_alignment(token_sets: list[torch.Tensor], gt: torch.Tensor) -> torch.Tensor:
    """Mean over token sets of max(0, mean cos over (normal, anomalous) patch pairs - mean cos over
    same-label pairs), pairs within an image; 0 without a normal patch in the batch or for a set
    without cross pairs. ``gt`` (B, N) in {0, 0.5, 1}: 0.5 patches take part in no pair."""
    if not bool((gt == 0).any()):
        return gt.new_zeros(())
    signs = torch.where(gt == 0, -torch.ones_like(gt), gt)
    pair = signs[:, :, None] * signs[:, None, :]
    cross, same = pair == -1, pair == 1
    total = gt.new_zeros(())
    for tokens in token_sets:
        t = F.normalize(tokens[:, 1:].float(), dim=-1)
        sim = t @ t.transpose(1, 2)
        if bool(cross.any()):
            gap = sim[cross].mean() - sim[same].mean()
            total = total + torch.where(gap > 0, gap, torch.zeros_like(gap))
    return total / len(token_sets)


# ---------------------------------------------------------------------- the method
@register_method
class BSRCLIP(Method):
    name = "bsrclip"
    description = "AF-CLIP base + background calibration, attention RCS, soft-gated SRR (ICMR; code-defined)"
    mask_resample = "bicubic"
    defaults: dict[str, Any] = {
        "image_size": 518, "prompt_len": 12, "layers": (6, 12, 18, 24), "radii": (1, 3, 5),
        "neighbour_sigma": 4.0, "temperature": 0.07, "adaptor_heads": 8, "adaptor_dim_head": 64,
        "bsr": True,
        "bg_beta": 0.52, "bg_quantile": 0.75, "bg_base_quantile": 0.95,
        "rcs_layers": (6, 7, 8, 9), "rcs_lambda": 1.5, "rcs_topk": 128, "rcs_gamma": 1.2, "rcs_tau": 1.0,
        "rcs_add_identity": True,
        "srr_sigma": 3.0, "srr_gate_quantile": 0.98, "srr_gate_temperature": 0.08,
        "sigma": 2.0, "sigma_without_refinement": 4.0,
        "focal_gamma": 4.0, "lambda1": 1.0, "lambda2": 1.0, "official_gt_aliasing": True,
    }
    ablations = {
        "no-calibration": "no background calibration of the patch logits",
        "no-rcs": "no attention correlation spreading (RCS)",
        "no-srr": "no soft-gated spatial refinement (SRR)",
    }
    recipe = TrainRecipe(epochs=2, batch_size=8, lr=1e-4, betas=(0.5, 0.999), seed=122)
    released: dict[str, str] = {}  # the authors published no weights

    def __init__(self, backbone, hparams=None, ablate=frozenset()) -> None:
        super().__init__(backbone, hparams, ablate)
        hp = self.hparams
        depth = backbone.vision_layers
        # The official indices, literally: blocks a shallower backbone lacks are simply absent
        # (their transformer never reaches them), exactly as the official code behaves.
        self.layers = tuple(int(l) for l in hp["layers"] if 1 <= int(l) <= depth)
        if not self.layers:
            raise BadInput(f"none of the feature layers {list(hp['layers'])} exists in this {depth}-block backbone.",
                           hint="set --hparam layers=[...] to blocks it has")
        self.rcs_layers = tuple(int(l) for l in hp["rcs_layers"] if 1 <= int(l) <= depth)
        self.kernels = {int(r): None if int(r) == 1 else gaussian_kernel2d(int(r), float(hp["neighbour_sigma"]))
                        for r in hp["radii"]}
        text_width = backbone.arch.text_width
        self.state_prompt_embedding = nn.Parameter(torch.empty(1, int(hp["prompt_len"]), text_width))
        nn.init.normal_(self.state_prompt_embedding, std=0.01)
        self.adaptor = Adaptor(backbone.arch.vision_width, int(hp["adaptor_heads"]), int(hp["adaptor_dim_head"]))
        self.register_buffer("state_prompt_tokens", backbone.tokenize(list(STATE_PROMPTS)).cpu(), persistent=False)

    # ------------------------------------------------------------------ switches
    def stage_on(self, stage: str) -> bool:
        return bool(self.hparams["bsr"]) and f"no-{stage}" not in self.ablate

    @property
    def smoothing_sigma(self) -> float:
        """The official evaluation smooths with sigma 2 when RCS or SRR runs, else sigma 4
        (calibration alone does not switch it)."""
        refined = self.stage_on("rcs") or self.stage_on("srr")
        return float(self.hparams["sigma"] if refined else self.hparams["sigma_without_refinement"])

    # ------------------------------------------------------------------ text
    def text_features(self) -> torch.Tensor:
        """(2, E) L2-normalised [normal, anomalous]; cached outside training."""
        return self.cached("text", self._compute_text_features)

    def _compute_text_features(self) -> torch.Tensor:
        ids = self.state_prompt_tokens
        tokens = self.backbone.token_embedding(ids)
        prefix = self.state_prompt_embedding.to(tokens.dtype).expand(ids.shape[0], -1, -1)
        context = self.backbone.arch.context_length
        embeddings = torch.cat([prefix, tokens], dim=1)[:, :context]
        eot = ids.argmax(dim=-1) + prefix.shape[1]
        return F.normalize(self.backbone.encode_text_embeddings(embeddings, eot).float(), dim=-1)

    # ------------------------------------------------------------------ forward
    def token_sets(self, taps: dict[int, torch.Tensor], grid: int) -> list[torch.Tensor]:
        """The 12 neighbour-aggregated sets (layer-major, radius-minor), through the Adaptor,
        ``ln_post`` and ``proj``: each (B, 1 + N, E)."""
        sets = []
        for layer in self.layers:
            for kernel in self.kernels.values():
                tokens = aggregate_neighbours(taps[layer], grid, kernel)
                sets.append(self.backbone.project(self.adaptor(tokens)))
        return sets

    def forward(self, images: torch.Tensor) -> MethodOutput:
        size = images.shape[-1]
        refine = not self.training  # the BSR chain is inference-only
        attn_layers = self.rcs_layers if refine and self.stage_on("rcs") else ()
        with torch.no_grad():  # the backbone is frozen
            feats = self.backbone.forward_image(images, taps=self.layers, pos_mode=self.position_interpolation,
                                                attn_probs=attn_layers, stop_after=max(self.layers + attn_layers))
        grid = feats.grid
        sets = self.token_sets(feats.taps, grid)
        text = self.text_features()
        temperature = float(self.hparams["temperature"])
        logits = sum(F.normalize(s.float(), dim=-1) @ text.T / temperature for s in sets) / len(sets)
        probs = logits.softmax(dim=-1)[..., 1]  # (B, 1 + N)
        image_score = probs[:, 0]
        patch = probs[:, 1:]
        extras = {"patch_probs": patch.reshape(-1, grid, grid), "token_sets": sets}
        if refine:
            with torch.no_grad():
                patch = self.refine(logits[:, 1:].detach(), patch.detach(),
                                    [feats.attn_probs[l] for l in attn_layers])
        maps = upsample(patch.reshape(-1, 1, grid, grid), size)[:, 0]
        if refine:
            maps = gaussian_smooth(maps.detach(), self.smoothing_sigma).to(maps.device)
        return MethodOutput(image_score=image_score, anomaly_map=maps, extras=extras)

    def refine(self, logits: torch.Tensor, patch: torch.Tensor, attn: list[torch.Tensor]) -> torch.Tensor:
        """The BSR chain on the patch map (B, N) -> (B, N)."""
        hp = self.hparams
        patch, logits = patch.float(), logits.float()
        if self.stage_on("calibration"):
            patch = background_calibration(logits, patch, beta0=float(hp["bg_beta"]),
                                           bg_quantile=float(hp["bg_quantile"]),
                                           base_quantile=float(hp["bg_base_quantile"]))
        if self.stage_on("rcs") and attn:
            affinity = attention_affinity([a.float() for a in attn], topk=int(hp["rcs_topk"]),
                                          gamma=float(hp["rcs_gamma"]), tau=float(hp["rcs_tau"]),
                                          add_identity=bool(hp["rcs_add_identity"]))
            spread = torch.bmm(affinity, patch[..., None])[..., 0]
            patch = patch + float(hp["rcs_lambda"]) * (spread - patch)
        if self.stage_on("srr"):
            grid = math.isqrt(patch.shape[1])
            half = _srr_kernel_size(float(hp["srr_sigma"])) // 2
            if grid <= half:
                raise BadInput(f"SRR's reflect-padded blur needs a patch grid larger than {half}; this input gives "
                               f"{grid} x {grid}.", hint="use a larger --image-size (518 is the method's), or "
                                                         "--ablate no-srr")
            patch = soft_gated_refinement(patch.reshape(-1, grid, grid), sigma=float(hp["srr_sigma"]),
                                          gate_quantile=float(hp["srr_gate_quantile"]),
                                          gate_temperature=float(hp["srr_gate_temperature"])).flatten(1)
        return patch

    # ------------------------------------------------------------------ training
    def loss(self, output: MethodOutput, masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """focal-BCE(image score) + lambda1 (focal-BCE + L1)(patch map, gt) + lambda2 patch alignment,
        focal gamma 4; gt bilinearly resized to the patch grid, < 0.5 -> 0, > 0.5 -> 1.

        ``official_gt_aliasing`` (default): the official patch-alignment loss rewrites the ground
        truth in place (0 -> -1, through a shallow ``copy.copy``) before backward runs, so the
        map losses' gradients see -1 where the patch is normal; their values do not. Reproduced."""
        hp = self.hparams
        probs = output.extras["patch_probs"]
        grid = probs.shape[-1]
        gt = F.interpolate(masks.float()[:, None], size=(grid, grid), mode="bilinear", align_corners=False)[:, 0]
        gt = torch.where(gt < 0.5, torch.zeros_like(gt), torch.where(gt > 0.5, torch.ones_like(gt), gt))
        gamma = float(hp["focal_gamma"])
        aliased = bool(hp["official_gt_aliasing"]) and bool((gt == 0).any())
        grad_gt = torch.where(gt == 0, -torch.ones_like(gt), gt) if aliased else None
        image = focal_bce(output.image_score, labels.float(), gamma)
        focal = focal_bce(probs, gt, gamma, grad_target=grad_gt)
        l1 = F.l1_loss(probs.float(), gt)
        if grad_gt is not None:  # same value; the gradient sign(p - t) with the rewritten t
            l1_grad = (probs.float() - grad_gt).abs().mean()
            l1 = l1_grad + (l1 - l1_grad).detach()
        align = patch_alignment(output.extras["token_sets"], gt.flatten(1))
        map_loss = float(hp["lambda1"]) * (focal + l1)
        align_loss = float(hp["lambda2"]) * align
        total = image + map_loss + align_loss
        return total, {"image": float(image.detach()), "map": float(map_loss.detach()),
                       "align": float(align_loss.detach())}

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def _plain_layout(obj: Any) -> bool:
        return (isinstance(obj, dict) and set(obj) == {"prompt", "adaptor"} and isinstance(obj["prompt"], dict)
                and isinstance(obj["prompt"].get("state_prompt_embedding"), torch.Tensor)
                and isinstance(obj["adaptor"], dict))

    @classmethod
    def authors_checkpoint_hparams(cls, obj: Any) -> dict[str, Any] | None:
        if not cls._plain_layout(obj):
            return None
        prompt = obj["prompt"]["state_prompt_embedding"]
        if prompt.ndim != 3 or prompt.shape[0] != 1:
            return None
        return {"prompt_len": int(prompt.shape[1])}

    @classmethod
    def read_authors_checkpoint(cls, checkpoint, *, allow_pickle: bool) -> Any:
        """The authors save ``{dataset}_prompt.pt`` (the prefix Parameter) and ``{dataset}_adaptor.pt``
        (the whole Adaptor module, a pickle of Python objects). Given either file, the other is
        found beside it; loading the module pickle needs ``--allow-pickle`` (allowlisted classes only)."""
        raw, path = checkpoint.raw, Path(checkpoint.path)
        if isinstance(raw, torch.Tensor) and path.name.endswith("_prompt.pt"):
            prompt_path, adaptor_path = path, path.with_name(path.name[:-len("_prompt.pt")] + "_adaptor.pt")
        elif isinstance(raw, nn.Module) and path.name.endswith("_adaptor.pt"):
            prompt_path, adaptor_path = path.with_name(path.name[:-len("_adaptor.pt")] + "_prompt.pt"), path
        else:
            return raw
        from zsadcli.core.checkpoints import load_checkpoint

        if not allow_pickle:
            raise BadInput(f"{adaptor_path.name} (the authors' Adaptor) is a whole-object pickle; zsad reads it "
                           "only with --allow-pickle.",
                           hint="add --allow-pickle: an allowlist unpickler restores the Adaptor's classes and "
                                "tensors and refuses anything else in the file")
        for needed in (prompt_path, adaptor_path):
            if not needed.is_file():
                raise BadInput(f"the authors' BSR-CLIP weights come as a pair; {needed} is missing.",
                               hint="keep {dataset}_prompt.pt and {dataset}_adaptor.pt in one folder")
        prompt = raw if prompt_path == path else load_checkpoint(prompt_path, allow_pickle=True).raw
        adaptor = raw if adaptor_path == path else load_checkpoint(adaptor_path, allow_pickle=True).raw
        if not isinstance(prompt, torch.Tensor) or not isinstance(adaptor, nn.Module):
            raise BadInput(f"{prompt_path.name} / {adaptor_path.name} are not the authors' prompt tensor and "
                           "Adaptor module.")
        return {"prompt": {"state_prompt_embedding": prompt.detach()},
                "adaptor": {k: v.detach() for k, v in adaptor.state_dict().items()}}

    def import_authors_checkpoint(self, obj: Any) -> None:
        prompt = obj["prompt"]["state_prompt_embedding"]
        if tuple(prompt.shape) != tuple(self.state_prompt_embedding.shape):
            raise BadInput(f"checkpoint tensor state_prompt_embedding has shape {tuple(prompt.shape)} but this "
                           f"backbone needs {tuple(self.state_prompt_embedding.shape)} (was it trained for another "
                           "CLIP?).")
        self.load_module_state(self.adaptor, obj["adaptor"], "BSR-CLIP Adaptor")
        with torch.no_grad():
            self.state_prompt_embedding.copy_(prompt.to(self.state_prompt_embedding.dtype))
        self.invalidate_caches()
