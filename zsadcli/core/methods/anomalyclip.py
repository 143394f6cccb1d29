"""AnomalyCLIP (Zhou et al., ICLR 2024), as zqhang/AnomalyCLIP computes it.

- Vision: v-v dual path (DPAM) over blocks 6-24, no MLP on that path; patch tokens of the
  v-v stream at the used layers (default 24 only: the released models come from code whose
  "6/12/18/24" were four aliases of layer 24), then ln_post and proj.
- Global feature: the original path's CLS @ proj *without* ln_post.
- Text: object-agnostic prompts ``[12 ctx] object.`` / ``[12 ctx] damaged object.`` with
  4-token deep prompts overwriting positions 1-4 before text blocks 2-9, fp16-rounded on
  insertion as the official code does (switchable: ``fp16_deep_prompts``).
- Scores: softmax(cos / 0.07); map per layer = (S_a + 1 - S_n) / 2 of the bilinearly
  upsampled 2-class softmax, summed over layers, Gaussian sigma 4 (scipy semantics).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from zsadcli.core.attention import DualPath
from zsadcli.core.losses import dice_loss, focal_loss
from zsadcli.core.methods import register_method
from zsadcli.core.methods.base import Method, MethodOutput, TrainRecipe
from zsadcli.core.postprocess import gaussian_smooth, upsample
from zsadcli.core.prompts import ObjectAgnosticPrompts


@register_method
class AnomalyCLIP(Method):
    name = "anomalyclip"
    description = "object-agnostic prompts + DPAM v-v attention (ICLR 2024)"
    defaults: dict[str, Any] = {
        "image_size": 518, "n_ctx": 12, "deep_depth": 9, "deep_len": 4, "dpam_start": 6,
        "layers": (24,), "temperature": 0.07, "sigma": 4.0, "fp16_deep_prompts": True,
        "loss_weight": 4.0,
    }
    ablations = {
        "no-dpam": "plain attention everywhere: patch tokens from the original path",
        "no-deep-prompts": "no deep text prompts (context tokens only)",
        "all-layers": "maps from layers 6, 12, 18, 24 as truly distinct layers (the paper's text)",
        "no-smoothing": "no Gaussian smoothing of the map",
    }
    recipe = TrainRecipe(epochs=15, batch_size=8, lr=1e-3, betas=(0.5, 0.999), seed=111)
    # trained-on -> weights.yaml key; the paper tests MVTec with the VisA model, the rest with MVTec's
    released = {"visa": "anomalyclip-trained-on-visa", "mvtec": "anomalyclip-trained-on-mvtec"}

    def __init__(self, backbone, hparams=None, ablate=frozenset()) -> None:
        super().__init__(backbone, hparams, ablate)
        hp = self.hparams
        self.prompts = ObjectAgnosticPrompts(backbone, n_ctx=int(hp["n_ctx"]), deep_depth=int(hp["deep_depth"]),
                                             deep_len=int(hp["deep_len"]))
        self.layers = (6, 12, 18, 24) if "all-layers" in self.ablate else tuple(int(l) for l in hp["layers"])
        self.layers = tuple(self._depth_relative(l) for l in self.layers)
        start = self._depth_relative(int(hp["dpam_start"]))
        self.dual = None if "no-dpam" in self.ablate else DualPath(start=start, attention="vv")

    def _depth_relative(self, layer: int) -> int:
        """Layer numbers are written for 24-block ViT-L/14; map them onto other depths."""
        depth = self.backbone.vision_layers
        return layer if depth == 24 else max(1, round(layer * depth / 24))

    @property
    def map_range(self) -> tuple[float, float]:
        return (0.0, float(len(self.layers)))  # one probability map per layer, summed

    # ------------------------------------------------------------------ text
    def text_features(self) -> torch.Tensor:
        """(2, E) L2-normalised [normal, anomalous]; computed once per model outside training."""
        return self.cached("text", self._compute_text_features)

    def _compute_text_features(self) -> torch.Tensor:
        embeddings, ids, deep = self.prompts()
        if "no-deep-prompts" in self.ablate:
            deep = []
        if self.hparams["fp16_deep_prompts"]:
            deep = [p.half().float() for p in deep]  # the official insertion casts with .half()
        features = self.backbone.encode_text_embeddings(embeddings, ids.argmax(dim=-1), deep).float()
        return F.normalize(features, dim=-1)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> MethodOutput:
        temperature = float(self.hparams["temperature"])
        size = images.shape[-1]
        with torch.no_grad():  # the backbone is frozen; only the text side learns
            feats = self.backbone.forward_image(images, taps=self.layers, dual=self.dual,
                                                pos_mode=self.position_interpolation)
            global_feature = F.normalize(self.backbone.global_feature(feats.tokens, ln_post=False).float(), dim=-1)
            patch_tokens = [F.normalize(self.backbone.project(
                feats.alt_taps.get(layer, feats.taps[layer])).float(), dim=-1) for layer in self.layers]
        text = self.text_features()
        image_logits = global_feature @ text.T / temperature
        image_score = image_logits.softmax(-1)[:, 1]
        prob_maps = []
        for tokens in patch_tokens:
            probs = (tokens @ text.T / temperature).softmax(-1)[:, 1:]  # drop CLS
            grid = feats.grid
            probs = probs.reshape(-1, grid, grid, 2).permute(0, 3, 1, 2)
            prob_maps.append(upsample(probs, size))
        anomaly = torch.stack([(p[:, 1] + 1 - p[:, 0]) / 2 for p in prob_maps]).sum(0)
        if "no-smoothing" not in self.ablate:
            anomaly = gaussian_smooth(anomaly.detach(), float(self.hparams["sigma"])).to(anomaly.device)
        return MethodOutput(image_score=image_score, anomaly_map=anomaly,
                            extras={"image_logits": image_logits, "prob_maps": prob_maps})

    def loss(self, output: MethodOutput, masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """CE(image logits) + 4 x sum over layers (focal + dice(S_a, gt) + dice(S_n, 1 - gt))."""
        gt = masks.float()
        image_loss = F.cross_entropy(output.extras["image_logits"], labels.long())
        map_loss = sum(focal_loss(p, gt) + dice_loss(p[:, 1], gt) + dice_loss(p[:, 0], 1 - gt)
                       for p in output.extras["prob_maps"])
        map_loss = float(self.hparams["loss_weight"]) * map_loss
        return map_loss + image_loss, {"map": float(map_loss.detach()), "image": float(image_loss.detach())}

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def authors_checkpoint_hparams(cls, obj: Any) -> dict[str, Any] | None:
        state = obj.get("prompt_learner") if isinstance(obj, dict) else None
        if not isinstance(state, dict) or "ctx_pos" not in state or len(obj) != 1:
            return None
        # The official code always saves its (unused) projections; Crane's files, otherwise the
        # same layout, do not: without them this is another method's checkpoint.
        if not any(k.startswith("compound_prompt_projections.") for k in state):
            return None
        return ObjectAgnosticPrompts.hparams_from_state(state)

    def import_authors_checkpoint(self, obj: Any) -> None:
        """``{"prompt_learner": {...}}``; the unused ``compound_prompt_projections`` are ignored
        and the stored token buffers replace the ones built from our tokenizer."""
        state = {k: v for k, v in obj["prompt_learner"].items() if not k.startswith("compound_prompt_projections.")}
        self.load_module_state(self.prompts, state, "AnomalyCLIP prompt learner")
        self.invalidate_caches()
