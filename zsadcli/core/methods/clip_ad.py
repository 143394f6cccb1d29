"""CLIP-AD (Chen et al., arXiv 2311.00453), as ByChelsea/CLIP-AD computes it.

SDP (``clip-ad``, training-free):
- Staged dual path (``core.attention.staged_surgery_forward``): v-v surgery in every block,
  restarted every depth/4 blocks, read at layers 3/6/9/12 with the official in-place aliasing
  of the stored tokens (layers 3/6/9 of the original path are the next block's post-attention
  state). Surgery tokens take the original path's CLS, then ``ln_post`` and ``proj``.
- Text: 9 normal / 10 anomalous states x 22 templates per class; each state's L2-normalised
  embeddings reduced to one vector by ``rep_vec`` (mean, pca, kde, dbscan, mean_shift; the
  official scripts use dbscan, eps/min_samples 1.5/25 on VisA, 0.5/15 elsewhere), rounded to
  fp16 and re-normalised in fp16 where the official code does so (all but mean).
- Map: feature surgery per layer, s_a = w_a cos_a - mean_c(w_c cos_c) with w = p / mean(p),
  p = softmax(cos(CLS, T)), summed over layers, bilinear upsampling, Gaussian sigma 8.
- Image score: softmax(100 cos(CLS_12, T))[anomalous]. The official score adds the map maximum
  after a per-class min-max over the whole test set (transductive): ``transductive`` (eval's
  ``--clip-ad-transductive``) applies it in ``finalize_class_scores``.

SDP+ (``clip-ad+``): four Linear(width -> embed) heads on the raw original-path tokens of the
same layers (CLS dropped); per layer softmax(100 cos)[anomalous] after bilinear upsampling with
align_corners=True, summed and added to SDP's map before smoothing (sigma 2 on VisA, else 8).
Trained with focal + dice per layer (Adam 1e-4, batch 8, 5 epochs, seed 42, in dataset order).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zsadcli.core.attention import staged_surgery_forward
from zsadcli.core.losses import layered_focal_dice
from zsadcli.core.methods import register_method
from zsadcli.core.methods.base import Method, MethodOutput, TrainRecipe
from zsadcli.core.postprocess import gaussian_smooth, upsample
from zsadcli.errors import BadInput

logger = logging.getLogger(__name__)

NORMAL_STATES = ("flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage", "{} without scratch", "{} without crack", "{} without contamination")
ANOMALOUS_STATES = ("damaged {}", "imperfect {}", "blemished {}", "broken {}", "{} with flaw", "{} with defect",
                    "{} with damage", "{} with scratch", "{} with crack", "{} with contamination")
# (sentence with {art} for the article, article order): the official 22 templates, in their order.
_TEMPLATE_PAIRS = (
    ("a cropped photo of {art} {{}}.", ("the", "a")), ("a close-up photo of {art} {{}}.", ("a", "the")),
    ("a bright photo of {art} {{}}.", ("a", "the")), ("a dark photo of {art} {{}}.", ("the", "a")),
    ("a jpeg corrupted photo of {art} {{}}.", ("a", "the")), ("a blurry photo of {art} {{}}.", ("the", "a")),
    ("a photo of {art} {{}}.", ("the", "a")),
)
TEMPLATES = tuple(t.format(art=a) for t, order in _TEMPLATE_PAIRS for a in order) + (
    "a photo of a large {}.", "a photo of the small {}.", "a photo of the large {}.", "a photo of a small {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)
REP_VECS = ("mean", "pca", "kde", "dbscan", "mean_shift")
KDE_BANDWIDTH = 0.3
MEAN_SHIFT_BANDWIDTH = 2.0


def state_prompts(states: tuple[str, ...], class_name: str) -> list[str]:
    """Every state x every template, state-major (the official order)."""
    return [template.format(state.format(class_name)) for state in states for template in TEMPLATES]


def dbscan_parameters(dataset: str | None) -> tuple[float, int]:
    """The official (eps, min_samples): keyed on the dataset name "visa"."""
    return (1.5, 25) if dataset == "visa" else (0.5, 15)


def _largest_cluster_mean(data: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return None
    label = np.argmax(np.bincount(clustered))
    return np.mean(data[labels == label], axis=0)


def _within(data: np.ndarray, bandwidth: float, margin: float = 1e-3) -> bool:
    """True when every pairwise distance is clearly below ``bandwidth``. Then flat-kernel mean
    shift seeded at every point moves each seed to the mean of all points in one step (the mean
    of a convex hull stays within ``bandwidth`` of every point), so there is one cluster holding
    every point: its mean is the mean of the data. Always the case for L2-normalised vectors and
    the official bandwidth 2 unless two are (nearly) antipodal."""
    sq = np.sum(data.astype(np.float64) ** 2, axis=1)
    dist2 = sq[:, None] + sq[None, :] - 2 * data.astype(np.float64) @ data.astype(np.float64).T
    return bool(np.sqrt(max(float(dist2.max()), 0.0)) < bandwidth - margin)


def representative_vector(embeddings: torch.Tensor, method: str, *, dbscan: tuple[float, int] = (0.5, 15),
                          fp16: bool = True) -> torch.Tensor:
    """One L2-normalised vector (fp32) for a state's L2-normalised prompt embeddings (n, E).

    ``fp16``: pca/kde/dbscan/mean_shift vectors are rounded to fp16 and re-normalised in fp16,
    as the official code does (``torch.tensor(..., dtype=torch.float16)``); mean stays fp32.
    """
    if method == "mean":
        vector = embeddings.mean(dim=0)
        return vector / vector.norm()
    data = embeddings.detach().float().cpu().numpy()
    if method == "pca":
        # first principal axis of the (E x n) matrix whose samples are the embedding dimensions,
        # with numpy calls of the same shapes and layouts as the official helper
        matrix = data.T
        centred = matrix - np.array([np.mean(matrix[:, i]) for i in range(matrix.shape[1])])
        values, vectors = np.linalg.eig(np.dot(np.transpose(centred), centred))
        axis = np.array([vectors[:, int(np.argmax(np.abs(values)))]])
        vector = np.real(np.dot(centred, np.transpose(axis)))[:, 0]
    elif method == "kde":
        from sklearn.neighbors import KernelDensity

        density = np.exp(KernelDensity(kernel="gaussian", bandwidth=KDE_BANDWIDTH).fit(data).score_samples(data))
        vector = np.sum(density[:, None] * data, axis=0) / np.sum(density)
    elif method in ("dbscan", "mean_shift"):
        from sklearn.cluster import DBSCAN, MeanShift

        eps, min_samples = dbscan
        if method == "mean_shift" and _within(data, MEAN_SHIFT_BANDWIDTH):
            vector = np.mean(data, axis=0)  # what MeanShift returns here, without its O(n^2 x seeds) search
        else:
            model = DBSCAN(eps=eps, min_samples=min_samples) if method == "dbscan" else MeanShift(bandwidth=MEAN_SHIFT_BANDWIDTH)
            vector = _largest_cluster_mean(data, model.fit(data).labels_)
        if vector is None:  # the official code fails here (argmax of an empty array)
            logger.warning("DBSCAN found no cluster (eps %s, min_samples %s): using the mean", eps, min_samples)
            vector = data.mean(axis=0)
    else:
        raise BadInput(f"unknown representative-vector method {method!r}.", hint=f"choose from {', '.join(REP_VECS)}")
    out = torch.tensor(vector, dtype=torch.float16 if fp16 else torch.float32)
    if method == "pca" and torch.dot(embeddings.mean(dim=0).cpu(), out.float()) < 0:
        out = -out  # an eigenvector's sign is arbitrary: align it with the mean embedding
    out = out / out.norm()
    return out.float().to(embeddings.device)


def feature_surgery_score(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, L, E) normalised tokens, (B, 2, E) text -> (B, L) anomalous surgery score
    s_a = w_a cos_a - mean_c(w_c cos_c), w = p / mean(p), p = softmax(cos(CLS, T))."""
    cos = torch.einsum("ble,bke->blk", features, text)
    prob = cos[:, :1].softmax(dim=-1)
    weighted = cos * (prob / prob.mean(dim=-1, keepdim=True))
    return (weighted - weighted.mean(dim=-1, keepdim=True))[..., 1]


@register_method
class ClipAD(Method):
    name = "clip-ad"
    description = "CLIP-AD SDP: staged dual-path surgery + representative text vectors (training-free)"
    backbone_key = "laion-vit-b-16-plus-240"
    quick_gelu = False
    position_interpolation = "bicubic+antialias"
    image_size = 240
    uses_class_name = True
    defaults: dict[str, Any] = {
        "image_size": 240, "layers": (3, 6, 9, 12), "sigma": None, "rep_vec": "dbscan", "dataset": None,
        "dbscan_eps": None, "dbscan_min_samples": None, "fp16_rep_vec": True, "transductive": False,
    }
    ablations = {
        "no-stages": "one surgery stream over all blocks (no restart every depth/4 blocks)",
        "exact-taps": "layer 3/6/9 tokens as they are after their block (no in-place aliasing)",
        "no-feature-surgery": "map from (cos_a - cos_n) / 2 without the CLS-probability weights",
        "last-layer-only": "map from the last tapped layer only",
        "no-smoothing": "no Gaussian smoothing of the map",
    }
    stage_count = 4

    def __init__(self, backbone, hparams=None, ablate=frozenset()) -> None:
        super().__init__(backbone, hparams, ablate)
        hp = self.hparams
        if hp["rep_vec"] not in REP_VECS:
            raise BadInput(f"--rep-vec {hp['rep_vec']!r}: choose from {', '.join(REP_VECS)}.")
        layers = tuple(self._depth_relative(int(l)) for l in hp["layers"])
        bad = [l for l in layers if not 1 <= l <= backbone.vision_layers]
        if bad:
            raise BadInput(f"layers {bad} do not exist: this backbone has {backbone.vision_layers} blocks.")
        self.layers = layers[-1:] if "last-layer-only" in self.ablate else layers
        self.tap_layers = layers  # the image score reads the last configured layer either way
        self.dataset_name: str | None = None

    def set_dataset(self, name: str | None) -> None:
        """The official scripts key DBSCAN's parameters (and SDP+'s smoothing) on the dataset name."""
        self.dataset_name = name

    def set_training_dataset(self, name: str) -> None:
        self.set_dataset(name)  # train.py builds its text vectors with the training set's name

    def _depth_relative(self, layer: int) -> int:
        """Layer numbers are written for the 12-block ViT-B-16-plus-240; map them onto other depths."""
        depth = self.backbone.vision_layers
        return layer if depth == 12 else max(1, round(layer * depth / 12))

    @property
    def dataset_key(self) -> str | None:
        return self.hparams["dataset"] or self.dataset_name

    @property
    def sigma(self) -> float:
        return 8.0 if self.hparams["sigma"] is None else float(self.hparams["sigma"])

    def surgery_bound(self) -> float:
        """The largest surgery score one layer can reach with this class's text vectors T_n, T_a.

        s_a = p_a cos_a - p_n cos_n = c (p_a - p_n) + d / 2 with c = f.(T_a + T_n)/2, d = f.(T_a - T_n)
        for a unit token f, and p_a - p_n = tanh((cos_a - cos_n)(CLS) / 2). With D = |T_a - T_n|:
        |d| <= D, |c| <= sqrt(1 - D^2/4), |p_a - p_n| <= tanh(D/2). The two prompts' vectors are
        close (D ~ 0.1-0.4 for CLIP), so the bound is far below the naive 1 of |cos| <= 1."""
        text = F.normalize(self.batch_text_features(1)[0].float(), dim=-1)
        distance = float((text[1] - text[0]).norm())
        return math.tanh(distance / 2) * math.sqrt(max(0.0, 1 - distance ** 2 / 4)) + distance / 2

    @property
    def map_range(self) -> tuple[float, float]:
        # The map sums signed per-layer surgery scores: below 0 the patch looks more normal than
        # anomalous, so the fixed colour scale starts at 0 (blue) and ends at the reachable maximum.
        return (0.0, len(self.layers) * self.surgery_bound())

    # ------------------------------------------------------------------ text
    def dbscan_parameters(self) -> tuple[float, int]:
        eps, min_samples = dbscan_parameters(self.dataset_key)
        hp = self.hparams
        return (float(hp["dbscan_eps"]) if hp["dbscan_eps"] is not None else eps,
                int(hp["dbscan_min_samples"]) if hp["dbscan_min_samples"] is not None else min_samples)

    def class_text_features(self, class_name: str) -> torch.Tensor:
        """(2, E) [normal, anomalous] representative vectors for ``class_name``; cached."""
        key = (class_name, self.hparams["rep_vec"], self.dbscan_parameters(), bool(self.hparams["fp16_rep_vec"]))
        return self.cached(key, lambda: self._representative_vectors(class_name), learned=False)

    def _representative_vectors(self, class_name: str) -> torch.Tensor:
        vectors = []
        with torch.no_grad():
            for states in (NORMAL_STATES, ANOMALOUS_STATES):
                embeddings = self.backbone.encode_text(self.backbone.tokenize(state_prompts(states, class_name))).float()
                embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
                vectors.append(representative_vector(embeddings, self.hparams["rep_vec"], dbscan=self.dbscan_parameters(),
                                                     fp16=bool(self.hparams["fp16_rep_vec"])))
        return torch.stack(vectors)

    def batch_text_features(self, batch: int) -> torch.Tensor:
        """(B, 2, E): per image its class's vectors (training batches mix classes)."""
        if self.batch_class_names is None:
            return self.class_text_features(self.class_name)[None].expand(batch, -1, -1)
        names = self.batch_class_names
        if len(names) != batch:
            raise BadInput(f"{len(names)} class names for a batch of {batch} images.")
        return torch.stack([self.class_text_features(n) for n in names])

    # ------------------------------------------------------------------ vision
    def staged_features(self, images: torch.Tensor):
        """Original-path and surgery-path tokens at the tapped layers (no autograd)."""
        with torch.no_grad():
            x, _ = self.backbone.embed_image(images, pos_mode=self.position_interpolation)
            x = self.backbone.visual.ln_pre(x)
            depth = self.backbone.vision_layers
            restart = None if "no-stages" in self.ablate else depth / self.stage_count
            return staged_surgery_forward(self.backbone.visual.transformer.resblocks, x, self.tap_layers,
                                          restart_every=restart, aliased_taps="exact-taps" not in self.ablate)

    def surgery_features(self, taps, layer: int) -> torch.Tensor:
        """Surgery tokens with the original path's CLS, ln_post + proj, L2-normalised (fp32)."""
        tokens = torch.cat([taps.original[layer][:, :1], taps.surgery[layer][:, 1:]], dim=1)
        return F.normalize(self.backbone.project(tokens).float(), dim=-1)

    def sdp_map(self, taps, text: torch.Tensor, grid: int, size: int) -> torch.Tensor:
        """(B, size, size) summed surgery scores, upsampled, before smoothing."""
        total = None
        for layer in self.layers:
            features = self.surgery_features(taps, layer)
            if "no-feature-surgery" in self.ablate:
                cos = torch.einsum("ble,bke->blk", features, text)
                score = (cos[..., 1] - cos.mean(dim=-1))
            else:
                score = feature_surgery_score(features, text)
            total = score if total is None else total + score
        patches = total[:, 1:].reshape(-1, 1, grid, grid)
        return upsample(patches, size)[:, 0]

    def forward(self, images: torch.Tensor) -> MethodOutput:
        size = images.shape[-1]
        grid = self.backbone.grid_for(size)
        taps = self.staged_features(images)
        text = self.batch_text_features(images.shape[0]).to(images.device)
        last = self.surgery_features(taps, self.tap_layers[-1])
        image_score = (100.0 * torch.einsum("be,bke->bk", last[:, 0], text)).softmax(dim=-1)[:, 1]
        anomaly = self.sdp_map(taps, text, grid, size)
        if "no-smoothing" not in self.ablate:
            anomaly = gaussian_smooth(anomaly.detach(), self.sigma).to(anomaly.device)
        return MethodOutput(image_score=image_score, anomaly_map=anomaly)

    def export_blockers(self) -> list[str]:
        if self.hparams["transductive"]:
            return ["the transductive image-score fusion (transductive=true) needs the scores of a whole test "
                    "class, not one image"]
        return []

    # ------------------------------------------------------------------ transductive fusion
    def finalize_class_scores(self, image_scores: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Official protocol: min-max(CLS score) + min-max(map max) over all test images of a class."""
        if not self.hparams["transductive"]:
            return image_scores

        def minmax(values: np.ndarray) -> np.ndarray:
            spread = values.max() - values.min()
            return (values - values.min()) / spread if spread > 0 else np.zeros_like(values)

        cls_scores = image_scores.float().cpu().numpy()
        map_max = maps.float().cpu().numpy().reshape(len(maps), -1).max(axis=1)
        return torch.from_numpy(minmax(cls_scores) + minmax(map_max))

    def class_scores_note(self) -> str | None:
        if not self.hparams["transductive"]:
            return None
        return ("transductive image scores (CLIP-AD's official protocol): per class, min-max of the CLS score "
                "+ min-max of the map maximum over the whole test set; not a per-image score")


@register_method
class ClipADPlus(ClipAD):
    name = "clip-ad+"
    description = "CLIP-AD SDP+: SDP plus four trained linear heads on layers 3/6/9/12"
    ablations = {
        **ClipAD.ablations,
        "no-heads": "SDP's map only (the trained heads off)",
        "no-sdp-map": "the heads' map only (SDP's surgery map off)",
    }
    recipe = TrainRecipe(epochs=5, batch_size=8, lr=1e-4, betas=(0.9, 0.999), seed=42, shuffle=False)
    released = {"mvtec": "clip-ad-trained-on-mvtec", "visa": "clip-ad-trained-on-visa"}
    # The CLIP-AD protocol: the VisA-trained heads for MVTec AD, HeadCT and BrainMRI, the
    # MVTec-trained ones for everything else (VisA, ISIC, ClinicDB, ...).
    visa_trained_for = ("mvtec", "headct", "brainmri")

    def __init__(self, backbone, hparams=None, ablate=frozenset()) -> None:
        super().__init__(backbone, hparams, ablate)
        arch = backbone.arch
        self.fc = nn.ModuleList(nn.Linear(arch.vision_width, arch.embed_dim) for _ in self.tap_layers)

    @classmethod
    def protocol_train_on(cls, test_dataset: str) -> str | None:
        return "visa" if test_dataset in cls.visa_trained_for else "mvtec"

    @property
    def sigma(self) -> float:
        if self.hparams["sigma"] is not None:
            return float(self.hparams["sigma"])
        return 2.0 if self.dataset_key == "visa" else 8.0  # the official SDP+ scripts' --smoothing

    @property
    def map_range(self) -> tuple[float, float]:
        # the heads' per-layer probabilities (0..1 each) plus SDP's surgery map (0..its bound)
        heads = 0.0 if "no-heads" in self.ablate else float(len(self.layers))
        sdp = 0.0 if "no-sdp-map" in self.ablate else len(self.layers) * self.surgery_bound()
        return (0.0, heads + sdp)

    def head_probabilities(self, taps, text: torch.Tensor, grid: int, size: int) -> list[torch.Tensor]:
        """Per layer (B, 2, size, size): softmax(100 cos(head(tokens), T)) after upsampling."""
        maps = []
        for index, layer in enumerate(self.tap_layers):
            if layer not in self.layers:
                continue
            tokens = taps.original[layer][:, 1:]
            head = self.fc[index]
            features = F.normalize(head(tokens.to(head.weight.dtype)).float(), dim=-1)
            logits = 100.0 * torch.einsum("ble,bke->bkl", features, text)
            logits = logits.reshape(logits.shape[0], 2, grid, grid)
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
            maps.append(logits.softmax(dim=1))
        return maps

    def forward(self, images: torch.Tensor) -> MethodOutput:
        size = images.shape[-1]
        grid = self.backbone.grid_for(size)
        taps = self.staged_features(images)
        text = self.batch_text_features(images.shape[0]).to(images.device)
        with torch.no_grad():
            last = self.surgery_features(taps, self.tap_layers[-1])
            image_score = (100.0 * torch.einsum("be,bke->bk", last[:, 0], text)).softmax(dim=-1)[:, 1]
        probs = [] if "no-heads" in self.ablate else self.head_probabilities(taps, text, grid, size)
        if self.training:  # the loss needs only the heads' maps
            anomaly = torch.stack([p[:, 1] for p in probs]).sum(0)
            return MethodOutput(image_score=image_score, anomaly_map=anomaly, extras={"prob_maps": probs})
        anomaly = torch.zeros(images.shape[0], size, size, device=images.device)
        if "no-sdp-map" not in self.ablate:
            with torch.no_grad():
                anomaly = anomaly + self.sdp_map(taps, text, grid, size)
        if probs:
            anomaly = anomaly + torch.stack([p[:, 1] for p in probs]).sum(0)
        if "no-smoothing" not in self.ablate:
            anomaly = gaussian_smooth(anomaly.detach(), self.sigma).to(anomaly.device)
        return MethodOutput(image_score=image_score, anomaly_map=anomaly, extras={"prob_maps": probs})

    def loss(self, output: MethodOutput, masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Sum over layers of focal(2-class probabilities) + dice(anomalous probability)."""
        return layered_focal_dice(output.extras["prob_maps"], masks)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def authors_checkpoint_hparams(cls, obj: Any) -> dict[str, Any] | None:
        """``{"linear_layers": {"fc.{i}.weight", "fc.{i}.bias"}}`` (ByChelsea/CLIP-AD ``train.py``)."""
        state = obj.get("linear_layers") if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not state or not all(k.startswith("fc.") for k in state):
            return None
        return {}

    def import_authors_checkpoint(self, obj: Any) -> None:
        state = {k[len("fc."):]: v for k, v in obj["linear_layers"].items()}
        self.load_module_state(self.fc, state, f"set of {len(self.tap_layers)} CLIP-AD+ heads")
