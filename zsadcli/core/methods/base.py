"""The Method contract the engine relies on (it knows nothing else about a method)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Hashable, Mapping

import torch
from PIL import Image
from torch import nn

from zsadcli.core.backbone import ClipBackbone
from zsadcli.data.images import clip_preprocess


@dataclass
class MethodOutput:
    """``image_score`` (B,) in [0, 1]; ``anomaly_map`` (B, S, S) at the input size after the
    method's smoothing — exactly what eval scores; ``extras`` carries what the loss needs."""

    image_score: torch.Tensor
    anomaly_map: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainRecipe:
    """The authors' optimiser and schedule."""

    epochs: int
    batch_size: int
    lr: float
    betas: tuple[float, float]
    seed: int
    shuffle: bool = True  # False where the official loader iterates the training set in order
    # Per training-set settings, keyed by the dataset name given to `zsad train --on`:
    epochs_on: Mapping[str, int] = field(default_factory=dict)  # epochs where they differ from ``epochs``
    mosaic_rate_on: Mapping[str, float] = field(default_factory=dict)  # 2x2 same-class mosaics (April-GAN)

    def epochs_for(self, dataset: str) -> int:
        return int(self.epochs_on.get(dataset, self.epochs))

    def mosaic_rate_for(self, dataset: str) -> float:
        return float(self.mosaic_rate_on.get(dataset, 0.0))


class Method(nn.Module):
    """A ZSAD method over a frozen CLIP backbone.

    Subclasses declare: ``name``, ``description``, ``backbone_key`` (weights.yaml),
    ``quick_gelu``, ``position_interpolation``, ``image_size``, ``defaults`` (hyperparameters),
    ``ablations`` (switch -> one-line description), ``recipe`` (None for training-free methods), ``released``
    (trained-on dataset -> weights.yaml checkpoint key) and implement ``forward``;
    trainable methods also ``loss`` and the checkpoint hooks.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    backbone_key: ClassVar[str] = "openai-vit-l-14-336"
    quick_gelu: ClassVar[bool] = True  # False: exact nn.GELU (open_clip configs without quick_gelu)
    # How the position grid is resized to the input size: the mode torch's interpolate takes
    # ("bilinear", "bicubic"), "+antialias" as open_clip's resize does. Methods trained on
    # weights resized one way must be run the same way.
    position_interpolation: ClassVar[str] = "bilinear"
    image_size: ClassVar[int] = 518
    mask_resample: ClassVar[str] = "bilinear"
    defaults: ClassVar[dict[str, Any]] = {}
    ablations: ClassVar[dict[str, str]] = {}
    recipe: ClassVar[TrainRecipe | None] = None
    released: ClassVar[dict[str, str]] = {}

    def __init__(self, backbone: ClipBackbone, hparams: dict[str, Any] | None = None,
                 ablate: frozenset[str] = frozenset()) -> None:
        super().__init__()
        unknown = set(ablate) - set(self.ablations)
        if unknown:
            from zsadcli.errors import BadInput

            raise BadInput(f"{self.name} has no ablation switch {', '.join(sorted(unknown))}.",
                           hint=f"its switches: {', '.join(self.ablations) or '(none)'}")
        unknown_hp = set(hparams or {}) - set(self.defaults)
        if unknown_hp:
            from zsadcli.errors import BadInput

            raise BadInput(f"{self.name} has no hyperparameter {', '.join(sorted(unknown_hp))} "
                           "(an option or --hparam that does not apply to this method).",
                           hint=f"its hyperparameters: {', '.join(sorted(self.defaults))}")
        self.backbone = backbone
        self.hparams = {**self.defaults, **(hparams or {})}
        self.ablate = frozenset(ablate)
        self.class_name = "object"
        self._cache: dict[Hashable, Any] = {}
        self.batch_class_names: list[str] | None = None

    @classmethod
    def check_hparam_values(cls, values: dict[str, Any], origin: str = "--hparam") -> None:
        """Refuse a value whose type does not fit the hyperparameter's default (exit 2 naming the key):
        a bool for a bool, an integer for an int, a finite number for a float, a list for a tuple or
        list, text for text; a hyperparameter whose default is None takes any value."""
        import math

        from zsadcli.errors import BadInput

        for key, value in values.items():
            if key not in cls.defaults or cls.defaults[key] is None:
                continue  # unknown keys are refused by __init__ with the list of known ones
            default = cls.defaults[key]
            if isinstance(default, bool):
                ok, want = isinstance(value, bool), "true or false"
            elif isinstance(default, int):
                ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif isinstance(default, float):
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                      and math.isfinite(value))
                want = "a finite number"
            elif isinstance(default, (tuple, list)):
                ok, want = isinstance(value, (tuple, list)), "a list, e.g. [1, 2]"
            else:
                ok, want = isinstance(value, type(default)), f"a {type(default).__name__}"
            if not ok:
                raise BadInput(f"{origin} {key}={value!r}: {cls.name}'s {key} must be {want} "
                               f"(default {default!r}).")

    # ----------------------------------------------------------------- inference
    uses_class_name: ClassVar[bool] = False  # class-aware prompts (WinCLIP, CLIP-AD)

    def set_class_name(self, name: str) -> None:
        """The object name class-aware methods put into their prompts (eval sets it per class)."""
        if self.uses_class_name and name != self.class_name:
            self.class_name = name
            self.invalidate_caches()

    def set_batch_class_names(self, names: list[str] | None) -> None:
        """Per-image object names for the next forward passes (training batches mix classes);
        None: ``class_name`` for every image. Only class-aware methods read it."""
        self.batch_class_names = list(names) if names is not None else None

    def set_dataset(self, name: str) -> None:
        """Eval hook: the name of the test dataset about to be scored, for methods whose authors
        use per-dataset settings (e.g. Crane+'s soft mean on DAGM and medical sets). Default: none."""

    def set_training_dataset(self, name: str) -> None:
        """Train hook: the name of the auxiliary dataset about to be trained on, for recipes keyed
        on it (e.g. CLIP-AD's DBSCAN parameters for VisA). Default: none."""

    def finalize_class_scores(self, image_scores: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Eval-time hook over a whole class (e.g. CLIP-AD's transductive fusion); default: unchanged."""
        return image_scores

    def class_scores_note(self) -> str | None:
        """A line for eval's notes when ``finalize_class_scores`` changes the scores; default: None."""
        return None

    @classmethod
    def preprocess_image(cls, image: Image.Image, size: int) -> torch.Tensor:
        """(3, size, size) model input for ``image``; the one preprocessing function the torch path
        and an exported model (which has no Method instance) share. Override this, not ``preprocess``."""
        return clip_preprocess(image, size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess_image(image, self.input_size)

    @property
    def input_size(self) -> int:
        return int(self.hparams.get("image_size", self.image_size))

    @property
    def map_range(self) -> tuple[float, float]:
        """The anomaly map's natural value range, for a fixed heatmap colour scale."""
        return (0.0, 1.0)

    def reference_paths(self) -> list[Path]:
        """Few-shot normal references (methods with ``reference`` and ``k_shot`` hyperparameters):
        the images of ``--reference DIR``, or of DIR/<class>/ when eval walks several classes; the
        first ``k_shot`` of them when it is set."""
        from zsadcli.data.images import expand_inputs

        root = Path(str(self.hparams["reference"])).expanduser()
        per_class = root / self.class_name
        folder = per_class if per_class.is_dir() else root
        if not folder.is_dir():
            from zsadcli.errors import BadInput

            raise BadInput(f"--reference {root}: not a folder of normal images.")
        paths = expand_inputs([str(folder)])
        k = self.hparams["k_shot"]
        return paths[:int(k)] if k else paths

    def export_blockers(self) -> list[str]:
        """Parts of this configuration that cannot be one static graph (`zsad export` refuses
        them, naming each); default: none. E.g. a step that needs a whole class's scores."""
        return []

    def forward(self, images: torch.Tensor) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def protocol_train_on(cls, test_dataset: str) -> str | None:
        """The papers' cross-dataset protocol: MVTec AD is tested with the VisA-trained model,
        every other dataset with the MVTec-trained one."""
        choice = "visa" if test_dataset == "mvtec" else "mvtec"
        return choice if choice in cls.released else None

    # ----------------------------------------------------------------- training
    @property
    def trainable(self) -> bool:
        return self.recipe is not None

    def loss(self, output: MethodOutput, masks: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError(f"{self.name} is training-free")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def make_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        assert self.recipe is not None
        return torch.optim.Adam(self.trainable_parameters(), lr=self.recipe.lr if lr is None else lr,
                                betas=self.recipe.betas)

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The tensors our checkpoint format stores (learned parts and their buffers)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.checkpoint_state()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            from zsadcli.errors import BadInput

            raise BadInput(f"checkpoint tensors do not fit {self.name}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}.")
        wrong = [f"{k} {tuple(state[k].shape)} (needs {tuple(own[k].shape)})" for k in own
                 if tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong:
            from zsadcli.errors import BadInput

            raise BadInput(f"checkpoint tensors do not fit this {self.name} and backbone: {', '.join(wrong[:3])}.",
                           hint="was it trained with another backbone or other hyperparameters?")
        self.load_state_dict({**{f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}, **state})
        self.invalidate_caches()

    @classmethod
    def authors_checkpoint_hparams(cls, obj: Any) -> dict[str, Any] | None:
        """Hyperparameters implied by an authors'-format checkpoint, or None if it is not one."""
        return None

    @classmethod
    def read_authors_checkpoint(cls, checkpoint: Any, *, allow_pickle: bool) -> Any:
        """The object the two hooks above receive for an authors'-format ``checkpoint``
        (a LoadedCheckpoint). Default: the file's content; a method whose authors' weights span
        several files reads the others here (beside ``checkpoint.path``)."""
        return checkpoint.raw

    def import_authors_checkpoint(self, obj: Any) -> None:
        raise NotImplementedError

    @staticmethod
    def load_module_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
        """Load an authors' state dict into ``module``: the same keys, the same shapes (else one
        clear error naming the part), cast to the module's own dtype and device."""
        from zsadcli.errors import BadInput

        own = module.state_dict()
        if set(state) != set(own):
            raise BadInput(f"checkpoint is not a {what}: keys {sorted(set(state) ^ set(own))[:4]} differ.")
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise BadInput(f"checkpoint tensor {key} of the {what} has shape {tuple(value.shape)} but this "
                               f"backbone needs {tuple(own[key].shape)} (was it trained for another CLIP?).")
        module.load_state_dict({k: v.to(device=own[k].device, dtype=own[k].dtype) for k, v in state.items()})

    def cached(self, key: Hashable, compute: Callable[[], Any], *, learned: bool = True) -> Any:
        """A value computed once per model and then reused, such as static text features.

        ``learned`` values depend on trainable parameters: in training they are recomputed on
        every call (gradients must flow); otherwise they are cached (tensors detached).
        ``invalidate_caches`` drops them: on train()/eval(), after loading weights, and when the
        class name of class-aware prompts changes."""
        if learned and self.training:
            return compute()
        if key not in self._cache:
            value = compute()
            self._cache[key] = value.detach() if isinstance(value, torch.Tensor) else value
        return self._cache[key]

    def train(self, mode: bool = True) -> "Method":
        self.invalidate_caches()
        return super().train(mode)

    def invalidate_caches(self) -> None:
        """Drop everything ``cached`` holds."""
        self._cache.clear()
