"""April-GAN ("VAND", Chen, Han, Zhang; arXiv 2305.17382), as ByChelsea/VAND-APRIL-GAN computes it.

- Backbone: OpenAI ViT-L/14@336 run the way the official vendored open_clip runs it at 518 px:
  exact nn.GELU (its factory rebuilds the model from a config without ``quick_gelu``) and the
  position grid resized bicubic with antialias (align_corners False), in fp32.
- Text, per class: 7 normal x 35 and 5 anomalous x 35 prompts; every embedding L2-normalised,
  one mean per side, normalised again. The class name is the dataset's folder name as is.
- Zero-shot map: four Linear(width -> embed) heads (with bias) on the raw residual tokens after
  blocks 6/12/18/24 (CLS dropped; no ln_post, no proj); per layer ``softmax(100 cos(head, T))``
  of the 2-channel logits upsampled bilinear with align_corners=True; the anomalous channel
  summed over the layers. No smoothing. Range [0, number of layers].
- Image score: ``softmax(100 cos(g, T))[anomalous]``, g = ln_post + proj of the final CLS.
- Few-shot (``reference``): a memory of the reference images' raw tokens per tapped layer;
  map += sum over layers of min over the memory of (1 - cos), upsampled the same way. The
  official image score, 0.5 (score + min-max over the class of the map maximum), needs the whole
  test set of a class: eval applies it in ``finalize_class_scores``; ``predict`` reports the
  zero-shot image score.
- Training: focal (2-class map) + dice (anomalous map) per layer, summed (Adam 1e-3, betas
  (0.5, 0.999), batch 8, seed 111; 3 epochs on MVTec with 2x2 mosaics at rate 0.2, 15 on VisA).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zsadcli.core.losses import layered_focal_dice
from zsadcli.core.methods import register_method
from zsadcli.core.methods.base import Method, MethodOutput, TrainRecipe
from zsadcli.errors import BadInput

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
# The official 35 ImageNet-style templates, in their order.
TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.", "a photo of a large {}.",
    "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a photo of the small {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "a dark photo of a {}.", "a photo of a cool {}.", "a photo of a small {}.", "there is a {} in the scene.",
    "there is the {} in the scene.", "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.",
)
# Layer numbers as written for the 24-block ViT-L/14; each switch drops one tapped layer.
OFFICIAL_LAYERS = (6, 12, 18, 24)


def state_prompts(states: tuple[str, ...], class_name: str) -> list[str]:
    """Every state x every template, state-major (the official order)."""
    return [template.format(state.format(class_name)) for state in states for template in TEMPLATES]


def upsample_aligned(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, g, g) -> (B, C, size, size), bilinear with align_corners=True as the official code."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=True)


def memory_distance(tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens vs a memory (M, C) -> (B, N): min over the memory of 1 - cos."""
    cos = F.normalize(tokens.float(), dim=-1) @ F.normalize(memory.float(), dim=-1).T
    return (1 - cos).min(dim=-1).values


@register_method
class AprilGAN(Method):
    name = "aprilgan"
    description = "April-GAN (VAND 2023): linear heads on four layers' raw tokens + a prompt ensemble; few-shot memory"
    quick_gelu = False  # the official vendored open_clip runs the OpenAI weights with exact GELU
    position_interpolation = "bicubic+antialias"  # its resize_pos_embed: bicubic, antialias, align_corners False
    image_size = 518
    uses_class_name = True
    defaults: dict[str, Any] = {"image_size": 518, "layers": OFFICIAL_LAYERS, "reference": None, "k_shot": None}
    ablations = {
        "no-few-shot": "zero-shot map and score only (the --reference memory off)",
        **{f"no-layer-{layer}": f"without tapped layer {index + 1} (block {layer} of 24; mapped on other depths): "
                                "neither its head nor its few-shot memory"
           for index, layer in enumerate(OFFICIAL_LAYERS)},
    }
    # 3 epochs with mosaics when trained on MVTec AD (-> the model for VisA and the rest); 15 on VisA.
    recipe = TrainRecipe(epochs=15, batch_size=8, lr=1e-3, betas=(0.5, 0.999), seed=111,
                         epochs_on={"mvtec": 3}, mosaic_rate_on={"mvtec": 0.2})
    released = {"mvtec": "aprilgan-trained-on-mvtec", "visa": "aprilgan-trained-on-visa"}

    def __init__(self, backbone, hparams=None, ablate=frozenset()) -> None:
        super().__init__(backbone, hparams, ablate)
        taps = tuple(self._depth_relative(int(layer)) for layer in self.hparams["layers"])
        bad = [layer for layer in taps if not 1 <= layer <= backbone.vision_layers]
        if bad:
            raise BadInput(f"layers {bad} do not exist: this backbone has {backbone.vision_layers} blocks.")
        self.tap_layers = taps
        dropped = {index for index, layer in enumerate(OFFICIAL_LAYERS) if f"no-layer-{layer}" in self.ablate}
        if dropped and len(taps) != len(OFFICIAL_LAYERS):
            raise BadInput(f"the no-layer-* switches name the {len(OFFICIAL_LAYERS)} official layers; "
                           f"this model taps {len(taps)}.")
        self.active = tuple(index for index in range(len(taps)) if index not in dropped)
        if not self.active:
            raise BadInput("every tapped layer is switched off: nothing is left to score with.")
        arch = backbone.arch
        self.fc = nn.ModuleList(nn.Linear(arch.vision_width, arch.embed_dim) for _ in taps)
        self._reference_cache: dict[tuple, list[torch.Tensor]] = {}

    def _depth_relative(self, layer: int) -> int:
        """Layer numbers are written for the 24-block ViT-L/14; map them onto other depths."""
        depth = self.backbone.vision_layers
        return layer if depth == 24 else max(1, round(layer * depth / 24))

    @property
    def few_shot(self) -> bool:
        return bool(self.hparams["reference"]) and "no-few-shot" not in self.ablate

    @property
    def map_range(self) -> tuple[float, float]:
        """Per layer a probability in [0, 1], plus with few-shot a distance 1 - cos in [0, 2]."""
        return (0.0, float(len(self.active) * (3 if self.few_shot else 1)))

    # ------------------------------------------------------------------ text
    def class_text_features(self, class_name: str) -> torch.Tensor:
        """(2, E) [normal, anomalous] for ``class_name``; cached per class."""
        return self.cached(("text", class_name), lambda: self._prompt_ensemble(class_name), learned=False)

    def _prompt_ensemble(self, class_name: str) -> torch.Tensor:
        vectors = []
        with torch.no_grad():
            for states in (NORMAL_STATES, ANOMALOUS_STATES):
                ids = self.backbone.tokenize(state_prompts(states, class_name))
                embeddings = F.normalize(self.backbone.encode_text(ids).float(), dim=-1)
                vectors.append(F.normalize(embeddings.mean(dim=0), dim=0))
        return torch.stack(vectors)

    def batch_text_features(self, batch: int) -> torch.Tensor:
        """(B, 2, E): per image its class's text features (training batches mix classes)."""
        if self.batch_class_names is None:  # one class for the batch: expand (no per-image list; a graph keeps B free)
            return self.class_text_features(self.class_name).unsqueeze(0).expand(batch, -1, -1)
        names = self.batch_class_names
        if len(names) != batch:
            raise BadInput(f"{len(names)} class names for a batch of {batch} images.")
        return torch.stack([self.class_text_features(n) for n in names])

    # ------------------------------------------------------------------ few-shot memory
    def reference_memory(self, device, dtype) -> list[torch.Tensor]:
        """Per tapped layer (M, C): the raw patch tokens of every reference image."""
        paths = self.reference_paths()
        key = (tuple(str(p) for p in paths), self.input_size, str(device), dtype, self.tap_layers)
        if key not in self._reference_cache:
            from zsadcli.data.images import open_image

            tokens: list[list[torch.Tensor]] = [[] for _ in self.tap_layers]
            with torch.no_grad():
                for path in paths:  # one at a time, as the official memory is built
                    image = self.preprocess(open_image(path))[None].to(device=device)
                    taps = self.backbone.forward_image(image, taps=self.tap_layers,
                                                       pos_mode=self.position_interpolation).taps
                    for index, layer in enumerate(self.tap_layers):
                        tokens[index].append(taps[layer][0, 1:])
            self._reference_cache = {key: [torch.cat(per_layer) for per_layer in tokens]}
        return self._reference_cache[key]

    # ------------------------------------------------------------------ forward
    def head_probabilities(self, taps: dict[int, torch.Tensor], text: torch.Tensor, grid: int,
                           size: int) -> list[torch.Tensor]:
        """Per active layer (B, 2, size, size): softmax over the upsampled 2-channel logits."""
        probs = []
        for index in self.active:
            head = self.fc[index]
            tokens = taps[self.tap_layers[index]][:, 1:]
            features = F.normalize(head(tokens.to(head.weight.dtype)).float(), dim=-1)
            logits = 100.0 * torch.einsum("bne,bke->bkn", features, text)
            logits = logits.reshape(logits.shape[0], 2, grid, grid)
            probs.append(upsample_aligned(logits, size).softmax(dim=1))
        return probs

    def forward(self, images: torch.Tensor) -> MethodOutput:
        size = images.shape[-1]
        with torch.no_grad():
            features = self.backbone.forward_image(images, taps=self.tap_layers, pos_mode=self.position_interpolation)
            text = self.batch_text_features(images.shape[0]).to(images.device)
            image = F.normalize(self.backbone.global_feature(features.tokens).float(), dim=-1)
            image_score = (100.0 * torch.einsum("be,bke->bk", image, text)).softmax(dim=-1)[:, 1]
        probs = self.head_probabilities(features.taps, text, features.grid, size)
        anomaly = torch.stack([p[:, 1] for p in probs]).sum(0)
        if self.few_shot and not self.training:
            with torch.no_grad():
                memory = self.reference_memory(images.device, images.dtype)
                distances = torch.stack([memory_distance(features.taps[self.tap_layers[index]][:, 1:], memory[index])
                                         for index in self.active], dim=1)
                grid = features.grid
                distances = upsample_aligned(distances.reshape(-1, len(self.active), grid, grid), size)
                anomaly = anomaly + distances.sum(dim=1)
        return MethodOutput(image_score=image_score, anomaly_map=anomaly, extras={"prob_maps": probs})

    # ------------------------------------------------------------------ few-shot image score (eval)
    def finalize_class_scores(self, image_scores: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """The official few-shot score: 0.5 (zero-shot score + min-max over the class of the map maximum)."""
        if not self.few_shot:
            return image_scores
        peaks = maps.float().reshape(len(maps), -1).amax(dim=1)
        spread = peaks.max() - peaks.min()
        scaled = (peaks - peaks.min()) / spread if spread > 0 else torch.zeros_like(peaks)
        return 0.5 * (image_scores.float() + scaled)

    def class_scores_note(self) -> str | None:
        if not self.few_shot:
            return None
        return ("few-shot image scores (April-GAN's official protocol): per class, 0.5 x (zero-shot score + "
                "min-max of the map maximum over the whole test set); not a per-image score")

    # ------------------------------------------------------------------ training
    def loss(self, output: MethodOutput, masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Sum over the layers of focal(2-class probabilities) + dice(anomalous probability)."""
        return layered_focal_dice(output.extras["prob_maps"], masks)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def authors_checkpoint_hparams(cls, obj: Any) -> dict[str, Any] | None:
        """``{"trainable_linearlayer": {"fc.{i}.weight", "fc.{i}.bias"}}`` (the official ``train.py``)."""
        state = obj.get("trainable_linearlayer") if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not state or not all(str(k).startswith("fc.") for k in state):
            return None
        return {}

    def import_authors_checkpoint(self, obj: Any) -> None:
        state = {k[len("fc."):]: v for k, v in obj["trainable_linearlayer"].items()}
        self.load_module_state(self.fc, state, f"set of {len(self.tap_layers)} April-GAN heads")

