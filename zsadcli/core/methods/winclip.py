"""WinCLIP (Jeong et al., CVPR 2023), zero- and few-shot, as anomalib computes it.

There is no official code; anomalib's implementation (``models/image/winclip``, with the
open_clip it locks, 2.24) is the one users know, and this reproduces it:
- Backbone open_clip ViT-B-16-plus-240 / laion400m_e31 (GELU), 240 px; preprocessing: RGB,
  uint8 -> float, antialiased bicubic resize of the float tensor, CLIP normalisation.
- Text: compositional prompt ensemble, 7 normal / 4 anomalous states x 21 templates (anomalib's
  list, in which "a jpeg corrupted photo of the {}." appears twice; ``dedupe_templates`` drops
  the copy); per state the mean of the *unnormalised* text embeddings.
- Windows of 2 and 3 patches (stride 1) over the patch grid: CLS + the window's tokens, taken
  after the position embedding and before ``ln_pre``, through the whole tower, CLS, ``ln_post``,
  ``proj``. All windows of a scale run as one batch (anomalib gathers them in a Python loop;
  ``window_chunk`` > 0 runs that many windows per pass, 1 = one window at a time).
- Scores softmax(cos / 0.07)[anomalous]; per scale, each patch gets the harmonic mean of the
  windows covering it; zero-shot map = harmonic mean of {image score, scale maps}; bilinear
  upsampling; no smoothing.
- Few-shot (WinCLIP+, ``reference``): memory of the reference images' ln_post-ed patch tokens
  and window embeddings; association score min (1 - cos) / 2; few-shot map = mean of the patch
  map and the harmonically aggregated window maps; map = (zero-shot + few-shot) / 2, image
  score = (zero-shot score + max of the few-shot map) / 2.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from zsadcli.core.graph import capturing
from zsadcli.core.methods import register_method
from zsadcli.core.methods.base import Method, MethodOutput
from zsadcli.data.images import OPENAI_MEAN, OPENAI_STD
from zsadcli.errors import BadInput

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
_DUPLICATE = "a jpeg corrupted photo of the {}."
# anomalib's 21 templates, in its order (the jpeg/"the" entry twice)
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.",
    _DUPLICATE, _DUPLICATE,
    "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(class_name: str, dedupe: bool = False) -> tuple[list[str], list[str]]:
    """(normal, anomalous) prompts, state-major."""
    templates = list(dict.fromkeys(TEMPLATES)) if dedupe else list(TEMPLATES)
    return tuple([t.format(s.format(class_name)) for s in states for t in templates]  # type: ignore[return-value]
                 for states in (NORMAL_STATES, ANOMALOUS_STATES))


def window_tokens(grid: int, kernel: int, stride: int = 1) -> torch.Tensor:
    """(n_windows, kernel^2) patch indices of every sliding window, windows and the patches within
    a window in row-major order (torch ``unfold`` order)."""
    if grid < kernel:
        raise BadInput(f"a {kernel}x{kernel}-patch window does not fit a {grid}x{grid} patch grid.")
    starts = torch.arange(0, grid - kernel + 1, stride)
    offsets = torch.arange(kernel)
    rows = (starts[:, None, None, None] + offsets[None, None, :, None]).expand(-1, len(starts), kernel, kernel)
    cols = (starts[None, :, None, None] + offsets[None, None, None, :]).expand(len(starts), -1, kernel, kernel)
    return (rows * grid + cols).reshape(-1, kernel * kernel)


def covering_windows(windows: torch.Tensor, n_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each patch the indices of the windows that contain it, padded with ``n_windows`` (a
    slot that holds 0 in the reciprocal sums), in ascending window order; and their counts."""
    n_windows = windows.shape[0]
    member = torch.zeros(n_patches, n_windows, dtype=torch.bool)
    member[windows.reshape(-1), torch.arange(n_windows).repeat_interleave(windows.shape[1])] = True
    counts = member.sum(dim=1)
    width = int(counts.max())
    index = torch.full((n_patches, width), n_windows, dtype=torch.long)
    for patch in range(n_patches):
        found = member[patch].nonzero()[:, 0]
        index[patch, :len(found)] = found
    return index, counts


def harmonic_aggregation(window_scores: torch.Tensor, index: torch.Tensor, counts: torch.Tensor,
                         grid: int) -> torch.Tensor:
    """(B, n_windows) -> (B, grid, grid): per patch, count / sum(1 / s) over the windows covering it
    (0 where that is inf or NaN, as anomalib)."""
    reciprocal = F.pad(1 / window_scores, (0, 1))  # the padding slot adds 0
    sums = reciprocal[:, index].sum(dim=-1)
    scores = counts.to(sums.dtype) / sums
    return scores.nan_to_num(posinf=0.0).reshape(-1, grid, grid)


def class_scores(embeddings: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(cos(e, [t_n, t_a]) / T)[anomalous] for embeddings (..., E)."""
    cos = F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).T
    return (cos / temperature).softmax(dim=-1)[..., 1]


def association_scores(embeddings: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, n, E) vs memory (M, E) -> (B, n): min over the memory of (1 - cos) / 2."""
    cos = F.normalize(embeddings, dim=-1) @ F.normalize(memory, dim=-1).T
    return (1 - cos).min(dim=-1).values / 2


@register_method
class WinCLIP(Method):
    name = "winclip"
    description = "WinCLIP: window-based CLIP scores with a compositional prompt ensemble (training-free)"
    backbone_key = "laion-vit-b-16-plus-240"
    quick_gelu = False
    position_interpolation = "bicubic+antialias"
    image_size = 240
    uses_class_name = True
    defaults: dict[str, Any] = {
        "image_size": 240, "scales": (2, 3), "temperature": 0.07, "reference": None, "k_shot": None,
        "dedupe_templates": False, "window_chunk": 0,
    }
    ablations = {
        "no-image-score": "zero-shot map from the window scales only (image score left out of the harmonic mean)",
        "no-small-windows": "without the smallest window scale",
        "no-large-windows": "without the largest window scale",
    }

    def __init__(self, backbone, hparams=None, ablate=frozenset()) -> None:
        super().__init__(backbone, hparams, ablate)
        scales = sorted(int(s) for s in self.hparams["scales"])
        if "no-small-windows" in self.ablate:
            scales = scales[1:]
        if "no-large-windows" in self.ablate:
            scales = scales[:-1]
        self.scales = tuple(scales)
        self._window_cache: dict[tuple, tuple] = {}
        self._reference_cache: dict[tuple, dict] = {}

    # ------------------------------------------------------------------ preprocessing
    @classmethod
    def preprocess_image(cls, image: Image.Image, size: int) -> torch.Tensor:
        """anomalib's: RGB, uint8 -> float (x 1/255), antialiased bicubic resize of the float
        tensor (values may overshoot [0, 1], as there), CLIP mean/std."""
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).mul_(1.0 / 255)
        if tensor.shape[-2:] != (size, size):
            tensor = F.interpolate(tensor[None], size=(size, size), mode="bicubic", align_corners=False,
                                   antialias=True)[0]
        mean = torch.tensor(OPENAI_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(OPENAI_STD, dtype=torch.float32).view(3, 1, 1)
        return tensor.sub(mean).div_(std)

    # ------------------------------------------------------------------ text
    def text_features(self) -> torch.Tensor:
        """(2, E) [normal, anomalous]: the mean of each state's unnormalised text embeddings; cached."""
        key = ("text", self.class_name, bool(self.hparams["dedupe_templates"]))
        return self.cached(key, self._compute_text_features, learned=False)

    def _compute_text_features(self) -> torch.Tensor:
        normal, anomalous = prompt_ensemble(self.class_name, dedupe=bool(self.hparams["dedupe_templates"]))
        with torch.no_grad():
            return torch.stack([self.backbone.encode_text(self.backbone.tokenize(prompts)).float().mean(dim=0)
                                for prompts in (normal, anomalous)])

    # ------------------------------------------------------------------ vision
    def windows(self, grid: int, kernel: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (grid, kernel, str(device))
        if key not in self._window_cache:
            tokens = window_tokens(grid, kernel)
            index, counts = covering_windows(tokens, grid * grid)
            self._window_cache[key] = (tokens.to(device), index.to(device), counts.to(device))
        return self._window_cache[key]

    def run_tower(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pre-ln_pre token sequences (N, L, C) -> ln_post-ed final tokens (N, L, C)."""
        x = self.backbone.visual.ln_pre(tokens)
        for block in self.backbone.visual.transformer.resblocks:
            x = block(x)
        return self.backbone.visual.ln_post(x)

    def window_embeddings(self, embedded: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, C) pre-ln_pre tokens -> (B, n_windows, E): each window with the CLS token
        through the tower, its CLS projected."""
        batch, n_windows = embedded.shape[0], windows.shape[0]
        index = torch.cat([windows.new_zeros(n_windows, 1), windows + 1], dim=1)  # CLS first
        sequences = embedded[:, index].reshape(batch * n_windows, index.shape[1], -1)
        chunk = 0 if capturing() else int(self.hparams["window_chunk"])  # a graph runs all windows at once
        cls = torch.cat([self.run_tower(part)[:, 0] for part in (sequences.split(chunk) if chunk else (sequences,))])
        return (cls @ self.backbone.visual.proj).reshape(batch, n_windows, -1)

    def encode(self, images: torch.Tensor) -> dict[str, Any]:
        """Image embedding (B, E), ln_post-ed patch tokens (B, N, C), window embeddings per scale."""
        embedded, grid = self.backbone.embed_image(images, pos_mode=self.position_interpolation)
        tokens = self.run_tower(embedded)
        windows = {k: self.window_embeddings(embedded, self.windows(grid, k, images.device)[0]) for k in self.scales}
        return {"image": tokens[:, 0] @ self.backbone.visual.proj, "patches": tokens[:, 1:], "windows": windows,
                "grid": grid}

    # ------------------------------------------------------------------ few-shot memory
    def reference_memory(self, size: int, device, dtype) -> dict | None:
        if not self.hparams["reference"]:
            return None
        paths = self.reference_paths()
        key = (tuple(str(p) for p in paths), size, str(device), dtype)
        if key not in self._reference_cache:
            from zsadcli.data.images import open_image

            images = torch.stack([self.preprocess(open_image(p)) for p in paths]).to(device=device)
            with torch.no_grad():
                encoded = self.encode(images)
            self._reference_cache = {key: {
                "patches": encoded["patches"].reshape(-1, encoded["patches"].shape[-1]),
                "windows": {k: v.reshape(-1, v.shape[-1]) for k, v in encoded["windows"].items()}}}
        return self._reference_cache[key]

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> MethodOutput:
        temperature = float(self.hparams["temperature"])
        size = images.shape[-1]
        with torch.no_grad():
            encoded = self.encode(images)
            grid = encoded["grid"]
            text = self.text_features().to(encoded["image"].dtype)
            image_score = class_scores(encoded["image"].float(), text.float(), temperature)
            maps = [] if "no-image-score" in self.ablate else [image_score.view(-1, 1, 1).expand(-1, grid, grid)]
            for k in self.scales:
                _, index, counts = self.windows(grid, k, images.device)
                scores = class_scores(encoded["windows"][k].float(), text.float(), temperature)
                maps.append(harmonic_aggregation(scores, index, counts, grid))
            zero_shot = len(maps) / (1 / torch.stack(maps)).sum(dim=0)
            memory = self.reference_memory(size, images.device, images.dtype)
            if memory is not None:
                few = [association_scores(encoded["patches"].float(), memory["patches"].float()).reshape(-1, grid, grid)]
                for k in self.scales:
                    _, index, counts = self.windows(grid, k, images.device)
                    scores = association_scores(encoded["windows"][k].float(), memory["windows"][k].float())
                    few.append(harmonic_aggregation(scores, index, counts, grid))
                few_shot = torch.stack(few).mean(dim=0)
                zero_shot = (zero_shot + few_shot) / 2
                image_score = (image_score + few_shot.amax(dim=(-2, -1))) / 2
            anomaly = F.interpolate(zero_shot[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return MethodOutput(image_score=image_score, anomaly_map=anomaly)
