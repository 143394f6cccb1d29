"""AdaCLIP (Cao et al., ECCV 2024), as caoyunkang/AdaCLIP computes it.

- Backbone: OpenAI weights run with exact nn.GELU and a bicubic position-grid resize without
  antialias (the authors' vendored open_clip rebuilds the model from a JSON config; their
  released prompts were trained that way).
- Hybrid prompts (type "SD", branch "VL", depth 4, length 5): static tokens (one 5 x width
  tensor per depth and tower) plus dynamic tokens, i.e. five linear heads over the pooled
  embedding of the *unprompted* image (ln_post(CLS) @ proj), the same dynamic tokens at every
  depth. Vision: appended after all tokens before block 1, replacing those last five before
  blocks 2-4, stripped from every output. Text: positions 1-5 overwritten before blocks 2-4
  (block 1 untouched: static text prompt 0 is a dead parameter). Both rounded through fp16 on
  insertion, as the official ``.half()`` does. The text is re-encoded per image (the official
  code broadcasts one image's dynamic tokens over the prompt batch, so only batch 1 works there;
  here every image gets its own sequences).
- Text: April-GAN's 7 normal / 5 abnormal states x 4 templates with the class name ('-' -> ' ');
  per state: L2 each, mean, L2.
- Heads: 4 x Linear(C -> E) on the raw tokens of blocks 6/12/18/24 (CLS dropped), Linear(E -> E)
  on the prompted pooled embedding; all L2-normalised. Logits = 100 x cosine.
- HSF: the top 5k patches by softmax(mean-layer logits)[anomalous] clustered with sklearn KMeans
  (k = 20) on the layer-concatenated tokens; the mean of the cluster centres (each the mean of
  its tokens over all layers), L2; image feature = L2(0.2 HSF + 0.8 cls head).
- Map: per-layer logits upsampled bilinear (align_corners=True), averaged, softmaxed,
  (p_a + 1 - p_n) / 2, Gaussian sigma 4. Score: softmax(100 g . T)[anomalous].

Deliberate differences: KMeans is seeded explicitly per image (``hsf_seed``; the official code
draws from the global NumPy RNG, so its scores depend on image order — one official process per
image, seeded 111 as test.py does, equals ours); grids with fewer than 5k patches cluster into
min(k, rows) clusters (the official code crashes there); batches of any size.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from zsadcli.core.losses import dice_loss, focal_loss
from zsadcli.core.methods import register_method
from zsadcli.core.methods.base import Method, MethodOutput, TrainRecipe
from zsadcli.core.postprocess import gaussian_smooth
from zsadcli.data.images import clip_preprocess
from zsadcli.errors import BadInput

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = ("a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
             "a cropped photo of the {}.")
AUTHORS_PREFIX = "clip_model."


def prompt_sentences(class_name: str) -> tuple[list[str], list[str]]:
    """The normal and abnormal sentences of one class (state x template, in the official order)."""
    name = class_name.replace("-", " ")
    return ([t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES],
            [t.format(s.format(name)) for s in ABNORMAL_STATES for t in TEMPLATES])


class Heads(nn.Module):
    """``n`` parallel linear maps (the authors' ``ProjectLayer``; key ``head.i``)."""

    def __init__(self, dim_in: int, dim_out: int, n: int) -> None:
        super().__init__()
        self.head = nn.ModuleList(nn.Linear(dim_in, dim_out) for _ in range(n))


class StaticPrompts(nn.Module):
    """One (length, width) learnable tensor per depth (the authors' ``PromptLayer``)."""

    def __init__(self, width: int, length: int, depth: int) -> None:
        super().__init__()
        self.static_prompts = nn.ParameterList(nn.Parameter(torch.empty(length, width)) for _ in range(depth))
        for prompt in self.static_prompts:
            nn.init.normal_(prompt, std=0.02)


class AdaCLIPParts(nn.Module):
    """Everything AdaCLIP learns, under the authors' names (their file adds ``clip_model.``).

    The official text prompter is sized by the embedding size (equal to the text width for
    ViT-L/14); here by the text width, so any CLIP works. Creation order = the official one."""

    def __init__(self, vision_width: int, text_width: int, embed_dim: int, n_layers: int, length: int,
                 depth: int) -> None:
        super().__init__()
        self.text_prompter = StaticPrompts(text_width, length, depth)
        self.visual_prompter = StaticPrompts(vision_width, length, depth)
        self.patch_token_layer = Heads(vision_width, embed_dim, n_layers)
        self.cls_token_layer = Heads(embed_dim, embed_dim, 1)
        self.dynamic_visual_prompt_generator = Heads(embed_dim, vision_width, length)
        self.dynamic_text_prompt_generator = Heads(embed_dim, text_width, length)


def hsf_cluster_labels(rows: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """KMeans labels of the selected patch rows (k, L*E), as the official HSF computes them:
    sklearn ``KMeans(n_clusters, n_init="auto")`` (k-means++ init, one Lloyd run), here with an
    explicit ``RandomState(seed)`` per image. Kept apart: it is the one step that is not a
    tensor op (its k-means++ init samples from a NumPy RNG), so exporters must treat it specially."""
    from sklearn.cluster import KMeans

    n_clusters = min(n_clusters, rows.shape[0])
    return KMeans(n_clusters=n_clusters, n_init="auto", random_state=np.random.RandomState(seed)).fit_predict(rows)


@register_method
class AdaCLIP(Method):
    name = "adaclip"
    description = "hybrid static + dynamic prompts in both towers, HSF image feature (ECCV 2024)"
    quick_gelu = False
    position_interpolation = "bicubic"  # align_corners False, no antialias (their resize_pos_embed)
    uses_class_name = True
    defaults: dict[str, Any] = {
        "image_size": 518, "layers": (6, 12, 18, 24), "prompt_length": 5, "prompt_depth": 4,
        "static_prompts": True, "dynamic_prompts": True, "visual_prompts": True, "text_prompts": True,
        "hsf": True, "k_clusters": 20, "hsf_alpha": 0.2, "hsf_seed": 111, "sigma": 4.0, "fp16_prompts": True,
        "weight_decay": 0.01,
    }
    ablations = {
        "no-dynamic": "static prompts only (the dynamic image-conditioned tokens are left out)",
        "no-static": "dynamic prompts only (the learned static tokens are left out)",
        "no-hsf": "image score from the cls head alone (no hybrid semantic fusion)",
        "vision-only": "prompts in the vision tower only: plain text prompts, encoded once per class",
        "text-only": "prompts in the text tower only: an unprompted vision tower",
        "no-smoothing": "no Gaussian smoothing of the map (= --hparam sigma=0)",
    }
    _ABLATION_HPARAMS = {"no-dynamic": {"dynamic_prompts": False}, "no-static": {"static_prompts": False},
                         "no-hsf": {"hsf": False}, "vision-only": {"text_prompts": False},
                         "text-only": {"visual_prompts": False}, "no-smoothing": {"sigma": 0.0}}
    recipe = TrainRecipe(epochs=5, batch_size=1, lr=0.01, betas=(0.5, 0.999), seed=111)
    released = {"mvtec,colondb": "adaclip-trained-on-mvtec-colondb",
                "visa,clinicdb": "adaclip-trained-on-visa-clinicdb",
                "all": "adaclip-trained-on-all"}

    def export_blockers(self) -> list[str]:
        # sklearn's k-means++ draws its start at random and Lloyd runs to a tolerance: no static graph
        # equals it; a fixed-iteration tensor KMeans would move scores by as much as a seed change does
        blockers = []
        if self.hparams["hsf"]:
            blockers.append("HSF's KMeans clustering of the top patches (sklearn, data-dependent iterations; "
                            "--ablate no-hsf turns it off)")
        if self.hparams["text_prompts"]:  # a Python list of per-image prompts fixes the batch size in a graph
            blockers.append("the text re-encoded per image with its dynamic prompts (a per-image loop over class "
                            "names; --ablate vision-only turns it off)")
        return blockers

    @classmethod
    def protocol_train_on(cls, test_dataset: str) -> str | None:
        """The paper's protocol: the VisA + ClinicDB model tests MVTec AD and ColonDB, the
        MVTec AD + ColonDB model every other dataset."""
        return "visa,clinicdb" if test_dataset in ("mvtec", "colondb") else "mvtec,colondb"

    def __init__(self, backbone, hparams=None, ablate=frozenset()) -> None:
        super().__init__(backbone, hparams, ablate)
        for switch in sorted(self.ablate):
            self.hparams.update(self._ABLATION_HPARAMS[switch])
        hp = self.hparams
        if not (hp["static_prompts"] or hp["dynamic_prompts"]):
            raise BadInput("adaclip needs static or dynamic prompts (no-static and no-dynamic exclude each other).")
        arch = backbone.arch
        self.layers = tuple(self._depth_relative(int(l)) for l in hp["layers"])
        if not self.layers:
            raise BadInput("adaclip needs at least one layer (hparam layers).")
        depth = int(hp["prompt_depth"])
        if depth < 1:
            raise BadInput("adaclip's prompt_depth must be at least 1.")
        self.parts = AdaCLIPParts(arch.vision_width, arch.text_width, arch.embed_dim, len(self.layers),
                                  int(hp["prompt_length"]), depth)

    def _depth_relative(self, layer: int) -> int:
        """Layer numbers are written for 24-block ViT-L/14; map them onto other depths."""
        depth = self.backbone.vision_layers
        return layer if depth == 24 else max(1, round(layer * depth / 24))

    @classmethod
    def preprocess_image(cls, image: Image.Image, size: int) -> torch.Tensor:
        """RGB first, then the bicubic squash (the official loader converts on opening)."""
        return clip_preprocess(image.convert("RGB"), size)

    # ------------------------------------------------------------------ prompts
    def _contexts(self, prompter: StaticPrompts, dynamic: torch.Tensor | None, batch: int) -> list[torch.Tensor]:
        """Per depth (B, n, width): static + dynamic tokens, rounded through fp16 as inserted."""
        out = []
        for static in prompter.static_prompts:
            parts = []
            if self.hparams["static_prompts"]:
                parts.append(static.unsqueeze(0).expand(batch, -1, -1))
            if dynamic is not None:
                parts.append(dynamic)
            context = parts[0] if len(parts) == 1 else parts[1] + parts[0]  # official order: dynamic + static
            if self.hparams["fp16_prompts"]:
                context = context.to(torch.float16).to(static.dtype)
            out.append(context)
        return out

    def _token_ids(self, class_name: str) -> tuple[torch.Tensor, int]:
        """Token ids of the normal then abnormal sentences (cached per class), and the normal count."""
        def compute():
            normal, abnormal = prompt_sentences(class_name)
            return self.backbone.tokenize(normal + abnormal), len(normal)
        return self.cached(("tokens", class_name), compute, learned=False)

    def text_features(self, class_names: list[str], dynamic_text: torch.Tensor | None) -> torch.Tensor:
        """(B, 2, E) L2-normalised [normal, abnormal] per image, from its class name and (text
        prompts on) its own deep prompts."""
        if not self.hparams["text_prompts"]:
            with torch.no_grad():  # plain prompts: nothing learned reaches the text tower
                per_class = {c: self.cached(("text", c), lambda c=c: self._encode_text([c], None)[0], learned=False)
                             for c in set(class_names)}
            return torch.stack([per_class[c] for c in class_names])
        return self._encode_text(class_names, dynamic_text)

    def _encode_text(self, class_names: list[str], dynamic_text: torch.Tensor | None) -> torch.Tensor:
        batch = len(class_names)
        ids, counts = zip(*(self._token_ids(c) for c in class_names))
        n_seq = ids[0].shape[0]
        token_ids = torch.cat(ids)
        eot = token_ids.argmax(dim=-1)
        # causal attention: nothing after the last EOT reaches a pooled feature, so cut there
        token_ids = token_ids[:, :max(int(eot.max()) + 1, 1 + int(self.hparams["prompt_length"]))]
        deep = None
        if self.hparams["text_prompts"]:
            contexts = self._contexts(self.parts.text_prompter, dynamic_text, batch)
            deep = [c.repeat_interleave(n_seq, dim=0) for c in contexts[1:]]  # block 1 is not prompted
        features = self.backbone.encode_text_embeddings(self.backbone.token_embedding(token_ids), eot, deep).float()
        features = F.normalize(features, dim=-1).reshape(batch, n_seq, -1)
        out = []
        for b, n_normal in enumerate(counts):
            states = [features[b, :n_normal].mean(0), features[b, n_normal:].mean(0)]
            out.append(F.normalize(torch.stack(states), dim=-1))
        return torch.stack(out)

    # ------------------------------------------------------------------ HSF
    def hybrid_semantic_fusion(self, patches: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, list]:
        """patches (L, B, N, E) L2-normalised, logits (L, B, N, 2) -> ((B, E) L2-normalised, the
        cluster label of each selected patch per image)."""
        n_layers, batch, n_patches, dim = patches.shape
        k_clusters = int(self.hparams["k_clusters"])
        probs = logits.mean(0).softmax(dim=-1)[..., 1]  # (B, N)
        top = probs.topk(min(n_patches, 5 * k_clusters), dim=1).indices
        selected = patches.gather(2, top[None, :, :, None].expand(n_layers, -1, -1, dim))  # (L, B, k, E)
        fused, all_labels = [], []
        for b in range(batch):
            rows = selected[:, b].permute(1, 0, 2).reshape(top.shape[1], n_layers * dim)
            labels = hsf_cluster_labels(rows.detach().float().cpu().numpy(), k_clusters, int(self.hparams["hsf_seed"]))
            all_labels.append(labels)
            onehot = F.one_hot(torch.from_numpy(labels).long().to(patches.device)).to(patches.dtype)  # (k, C)
            sums = torch.einsum("kc,lke->ce", onehot, selected[:, b])
            counts = onehot.sum(0) * n_layers
            present = counts > 0
            fused.append((sums[present] / counts[present, None]).mean(0))
        return F.normalize(torch.stack(fused), dim=-1), all_labels

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> MethodOutput:
        hp = self.hparams
        size = images.shape[-1]
        batch = images.shape[0]
        pos_mode = self.position_interpolation
        class_names = self.batch_class_names or [self.class_name] * batch
        if len(class_names) != batch:
            raise BadInput(f"{len(class_names)} class names for a batch of {batch} images.")
        parts = self.parts
        dynamic_visual = dynamic_text = None
        if hp["dynamic_prompts"]:
            with torch.no_grad():  # the frozen, unprompted tower conditions the prompts
                plain = self.backbone.forward_image(images, pos_mode=pos_mode)
                pooled = self.backbone.global_feature(plain.tokens)
            dynamic_visual = torch.stack([h(pooled) for h in parts.dynamic_visual_prompt_generator.head], dim=1)
            dynamic_text = torch.stack([h(pooled) for h in parts.dynamic_text_prompt_generator.head], dim=1)
        visual_prompts = (self._contexts(parts.visual_prompter, dynamic_visual, batch)
                          if hp["visual_prompts"] else [])
        feats = self.backbone.forward_image(images, taps=self.layers, pos_mode=pos_mode, prompts=visual_prompts)
        pooled = self.backbone.global_feature(feats.tokens)
        patches = torch.stack([F.normalize(head(feats.taps[l][:, 1:]).float(), dim=-1)
                               for head, l in zip(parts.patch_token_layer.head, self.layers)])  # (L, B, N, E)
        cls_feature = F.normalize(parts.cls_token_layer.head[0](pooled).float(), dim=-1)
        text = self.text_features(class_names, dynamic_text)  # (B, 2, E)
        logits = 100.0 * patches @ text.unsqueeze(0).transpose(-1, -2)  # (L, B, N, 2)

        extras: dict[str, Any] = {}
        if hp["hsf"]:
            alpha = float(hp["hsf_alpha"])
            fused, extras["hsf_labels"] = self.hybrid_semantic_fusion(patches, logits)
            g = F.normalize(alpha * fused + (1 - alpha) * cls_feature, dim=-1)
        else:
            g = cls_feature
        image_probs = (100.0 * (g.unsqueeze(1) @ text.transpose(1, 2))).squeeze(1).softmax(dim=-1)  # (B, 2)

        grid = feats.grid
        n_layers = logits.shape[0]
        up = F.interpolate(logits.permute(0, 1, 3, 2).reshape(n_layers * batch, 2, grid, grid), size=(size, size),
                           mode="bilinear", align_corners=True).reshape(n_layers, batch, 2, size, size)
        mean_probs = up.mean(0).softmax(dim=1)
        anomaly = (mean_probs[:, 1] + 1 - mean_probs[:, 0]) / 2
        extras["image_probs"] = image_probs
        if self.training:
            extras["prob_maps"] = list(up.softmax(dim=2))
        sigma = float(hp["sigma"])
        if sigma > 0 and not self.training:
            anomaly = gaussian_smooth(anomaly.detach(), sigma).to(anomaly.device)
        return MethodOutput(image_score=image_probs[:, 1], anomaly_map=anomaly, extras=extras)

    # ------------------------------------------------------------------ training
    def loss(self, output: MethodOutput, masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Focal(image probs) + sum over layers (focal + dice(p_a, gt) + dice(p_n, 1 - gt)).

        The ground truth is squeezed as the official trainer does (``gt.squeeze()``): at batch 1
        the Dice terms are therefore averaged over the map's rows, as in the released training."""
        gt = masks.float().squeeze()
        probs = output.extras["image_probs"]
        image_loss = focal_loss(probs[:, :, None, None], labels.long().reshape(-1, 1, 1))
        map_loss = sum(focal_loss(p, gt) + dice_loss(p[:, 1], gt) + dice_loss(p[:, 0], 1 - gt)
                       for p in output.extras["prob_maps"])
        return map_loss + image_loss, {"map": float(map_loss.detach()), "image": float(image_loss.detach())}

    def make_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        """AdamW, lr 0.01, betas (0.5, 0.999), weight decay 0.01 (torch's default, which the official code keeps)."""
        assert self.recipe is not None
        return torch.optim.AdamW(self.trainable_parameters(), lr=lr or self.recipe.lr, betas=self.recipe.betas,
                                 weight_decay=float(self.hparams["weight_decay"]))

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def authors_checkpoint_hparams(cls, obj: Any) -> dict[str, Any] | None:
        if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
            return None
        if not all(k.startswith(AUTHORS_PREFIX) for k in obj):
            return None
        heads = f"{AUTHORS_PREFIX}patch_token_layer.head.0.weight"
        static = f"{AUTHORS_PREFIX}visual_prompter.static_prompts.0"
        if heads not in obj or static not in obj:
            return None
        depth = len({k for k in obj if k.startswith(f"{AUTHORS_PREFIX}visual_prompter.static_prompts.")})
        return {"prompt_length": int(obj[static].shape[0]), "prompt_depth": depth}

    def import_authors_checkpoint(self, obj: Any) -> None:
        """The official trainer's learnable entries (``clip_model.``-prefixed), loaded strictly:
        every key and shape must match (the official ``strict=False`` load ignores misnamed keys)."""
        state = {k[len(AUTHORS_PREFIX):]: v for k, v in obj.items()}
        self.load_module_state(self.parts, state, "AdaCLIP checkpoint (clip_model.* learnable entries)")
        self.invalidate_caches()
