"""The one inference seam: "(image score, anomaly map) for this preprocessed batch".

predict, eval (and whatever else scores images) talk to a ``Runner``; a torch ``Method`` and an
exported model (OpenVINO Runtime, ONNX Runtime; see ``core/export.py``) are two implementations.
Preprocessing is the method class's own ``preprocess_image`` in both, so an exported model takes
exactly the tensor the torch method takes.

An exported model is a folder: the model file(s) and ``zsad-model.json`` (MODEL_CARD), which
names the method, its settings and the sha256 of every file it was made from and consists of.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from zsadcli.core.methods import Method, MethodOutput, get_method
from zsadcli.errors import BadInput, ChecksumMismatch

MODEL_CARD = "zsad-model.json"
CARD_SCHEMA = "zsad-model"
CARD_VERSION = 1  # bump on any change a reader must know about; readers refuse other versions
FORMATS = {"openvino": ("model.xml", "model.bin"), "onnx": ("model.onnx", "model.onnx.data")}
RUNTIME_PRECISIONS = ("fp32", "bf16")
EXTRAS = {"openvino": ("openvino", "openvino"), "onnx": ("onnxruntime", "onnx")}  # format -> (module, extra)


def require_extra(fmt: str, *modules: str) -> None:
    """Exit 2 with the pip command when an optional runtime/exporter is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extra = EXTRAS[fmt][1]
        raise BadInput(f"the {fmt} format needs {', '.join(missing)}, which is not installed.",
                       hint=f"pip install 'zsad[{extra}]'")


# ---------------------------------------------------------------------- the seam
class Runner:
    """What scoring code needs from the thing that computes scores; hooks default to no-ops."""

    name: str = ""
    description: dict[str, Any] = {}
    input_size: int = 0
    map_range: tuple[float, float] = (0.0, 1.0)
    mask_resample: str = "bilinear"

    @property
    def device(self) -> torch.device:
        """Where input batches go (pinned host memory is used for a CUDA device)."""
        return torch.device("cpu")

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def run(self, images: torch.Tensor) -> MethodOutput:
        """(B, 3, S, S) preprocessed images -> image_score (B,), anomaly_map (B, S, S)."""
        raise NotImplementedError

    # eval's per-dataset / per-class hooks (see the Method contract)
    def set_dataset(self, name: str) -> None:
        pass

    def set_class_name(self, name: str) -> None:
        pass

    def finalize_class_scores(self, image_scores: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        return image_scores

    def class_scores_note(self) -> str | None:
        return None


class TorchRunner(Runner):
    """A torch Method, run on its own device and dtype."""

    def __init__(self, method: Method, description: dict[str, Any] | None = None) -> None:
        self.method = method
        self.name = method.name
        self.description = description or {"method": method.name}

    @property
    def input_size(self) -> int:  # type: ignore[override]
        return self.method.input_size

    @property
    def map_range(self) -> tuple[float, float]:  # type: ignore[override]
        return self.method.map_range

    @property
    def mask_resample(self) -> str:  # type: ignore[override]
        return self.method.mask_resample

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.method.preprocess(image)

    @property
    def device(self) -> torch.device:
        return next(self.method.parameters()).device

    def run(self, images: torch.Tensor) -> MethodOutput:
        return self.method(images.to(self.device, non_blocking=True))

    def set_dataset(self, name: str) -> None:
        self.method.set_dataset(name)

    def set_class_name(self, name: str) -> None:
        self.method.set_class_name(name)

    def finalize_class_scores(self, image_scores: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        return self.method.finalize_class_scores(image_scores, maps)

    def class_scores_note(self) -> str | None:
        return self.method.class_scores_note()


def as_runner(method: Method | Runner) -> Runner:
    """Scoring functions accept a Method (the torch path) or any Runner."""
    return method if isinstance(method, Runner) else TorchRunner(method)


# ---------------------------------------------------------------------- model folders
def sha256_file(path: Path) -> str:
    from zsadcli.core.hub import file_digests

    return file_digests(Path(path))["sha256"]


@dataclass
class ModelCard:
    """``zsad-model.json`` of an exported model, validated."""

    folder: Path
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.data["method"])

    @property
    def format(self) -> str:
        return str(self.data["format"])

    @property
    def image_size(self) -> int:
        return int(self.data["image_size"])

    @property
    def files(self) -> dict[str, str]:
        return dict(self.data["files"])


_REQUIRED_KEYS = ("schema", "version", "zsad_version", "method", "format", "image_size", "map_range", "files",
                  "precision", "hparams", "class_name", "normalisation", "sources", "exporter")
_VERIFIED: dict[tuple, bool] = {}  # (file, size, mtime, sha) already hashed in this process


def read_model_card(folder: str | os.PathLike, *, verify: bool = True) -> ModelCard:
    """The validated card of an exported model folder: exit 2 when the folder is not one (no or
    broken json, a schema from another zsad version, a missing model file), exit 4 when a model
    file's sha256 differs from the one recorded at export."""
    folder = Path(folder)
    card_path = folder / MODEL_CARD
    if not folder.is_dir():
        raise BadInput(f"--model {folder}: no such folder.", hint="give the folder `zsad export --out` wrote")
    if not card_path.is_file():
        raise BadInput(f"--model {folder} is not an exported zsad model: {MODEL_CARD} is missing.",
                       hint="give the folder `zsad export --out` wrote")
    try:
        data = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{card_path} cannot be read as JSON ({exc}).", hint="export the model again") from None
    if not isinstance(data, dict) or data.get("schema") != CARD_SCHEMA:
        raise BadInput(f"{card_path} is not a zsad model card (schema {data.get('schema') if isinstance(data, dict) else None!r}).")
    if data.get("version") != CARD_VERSION:
        raise BadInput(f"{card_path} has model-card schema version {data.get('version')!r} (written by zsad "
                       f"{data.get('zsad_version', '?')}); this zsad reads version {CARD_VERSION}.",
                       hint="export the model again with this zsad, or use the zsad version that wrote it")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise BadInput(f"{card_path} lacks {', '.join(missing)}.", hint="export the model again")
    if data["format"] not in FORMATS:
        raise BadInput(f"{card_path}: unknown model format {data['format']!r}.", hint=f"known: {', '.join(FORMATS)}")
    card = ModelCard(folder, data)
    get_method(card.method)  # a method this zsad knows
    for name, digest in card.files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise BadInput(f"--model {folder}: model file {name} named in {MODEL_CARD} is missing.",
                           hint="copy the whole folder, or export the model again")
        if verify:
            stat = path.stat()
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, digest)
            if key not in _VERIFIED:
                actual = sha256_file(path)
                if actual != digest:
                    raise ChecksumMismatch(f"model file {path} has sha256 {actual[:12]}… but {MODEL_CARD} records "
                                           f"{digest[:12]}…: the file changed after export.",
                                           hint="export the model again, or restore the original file")
                _VERIFIED[key] = True
    return card


class ExportedRunner(Runner):
    """An exported model run by OpenVINO Runtime or ONNX Runtime on the CPU."""

    backend: ClassVar[str] = ""

    def __init__(self, card: ModelCard, precision: str) -> None:
        self.card = card
        self.name = card.method
        self.method_class = get_method(card.method)
        self.input_size = card.image_size
        self.map_range = tuple(float(v) for v in card.data["map_range"])  # type: ignore[assignment]
        self.mask_resample = self.method_class.mask_resample
        self.precision = precision  # what the runtime actually runs, for the logs and run configs
        self._class_mismatch: set[str] = set()
        self._dataset_note = False
        self.description = {"method": card.method, "model": str(card.folder), "format": card.format,
                            "runtime": self.backend, "precision": precision, "image_size": card.image_size,
                            "hparams": card.data["hparams"], "ablate": card.data.get("ablate", []),
                            "class_name": card.data["class_name"], "device": "cpu",
                            "sources": card.data["sources"]}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.method_class.preprocess_image(image, self.input_size)

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def run(self, images: torch.Tensor) -> MethodOutput:
        size = self.input_size
        if tuple(images.shape[1:]) != (3, size, size):
            raise BadInput(f"the exported model takes (B, 3, {size}, {size}) images, not {tuple(images.shape)}.")
        score, maps = self.infer(np.ascontiguousarray(images.detach().cpu().float().numpy()))
        return MethodOutput(image_score=torch.from_numpy(np.asarray(score, dtype=np.float32)),
                            anomaly_map=torch.from_numpy(np.asarray(maps, dtype=np.float32)))

    def set_dataset(self, name: str) -> None:
        self._dataset_note = bool(self.card.data.get("dataset_dependent"))

    def set_class_name(self, name: str) -> None:
        baked = self.card.data["class_name"]
        if baked is not None and name != baked:
            self._class_mismatch.add(name)

    def class_scores_note(self) -> str | None:
        notes = []
        if self._class_mismatch:
            notes.append(f"the exported model has the class name {self.card.data['class_name']!r} baked into its "
                         f"prompts and used it for {', '.join(sorted(self._class_mismatch))} (export one model per "
                         "class with --class-name for class-specific prompts)")
            self._class_mismatch = set()
        if self._dataset_note:
            notes.append(f"{self.name} keys some settings on the dataset name; the exported model has those "
                         "fixed as exported (see hparams in zsad-model.json)")
        return "; ".join(notes) or None


class OpenVINORunner(ExportedRunner):
    backend = "openvino"

    def __init__(self, card: ModelCard, precision: str | None) -> None:
        require_extra("openvino", "openvino")
        import openvino as ov

        core = ov.Core()
        config = {}
        wanted = precision or card.data["precision"]
        if wanted in RUNTIME_PRECISIONS:
            config["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16"}[wanted]
        model = core.read_model(str(card.folder / FORMATS["openvino"][0]))
        self.compiled = core.compile_model(model, "CPU", config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # what the plugin actually runs
        name = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        ran = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(name, name)
        if wanted in RUNTIME_PRECISIONS and ran != wanted:
            raise BadInput(f"OpenVINO's CPU plugin does not run {wanted} on this machine (it runs {ran}).",
                           hint="use --precision fp32, or leave --precision out for the device's preference")
        self.request = self.compiled.create_infer_request()
        super().__init__(card, ran)

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.request.infer({0: images})
        return result[self.compiled.output(0)], result[self.compiled.output(1)]


class OnnxRuntimeRunner(ExportedRunner):
    backend = "onnxruntime"

    def __init__(self, card: ModelCard, precision: str | None) -> None:
        require_extra("onnx", "onnxruntime")
        if (precision or "fp32") != "fp32":
            raise BadInput(f"--precision {precision}: ONNX Runtime runs the exported model in fp32 on the CPU.",
                           hint="use --precision fp32, or export with --format openvino for bf16")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # its constant-folding notices are not the user's business
        self.session = ort.InferenceSession(str(card.folder / FORMATS["onnx"][0]), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        super().__init__(card, "fp32")

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, maps = self.session.run(None, {self.input_name: images})
        return score, maps


def load_exported(folder: str | os.PathLike, precision: str | None = None) -> ExportedRunner:
    """The runner for an exported model folder; ``precision`` None: the card's (fp32, bf16, or
    auto: OpenVINO picks the device's preference, e.g. bf16 on CPUs with AMX)."""
    if precision is not None and precision not in RUNTIME_PRECISIONS:
        raise BadInput(f"--precision {precision}: an exported model runs fp32 or bf16 (OpenVINO).")
    card = read_model_card(folder)
    runner = OpenVINORunner(card, precision) if card.format == "openvino" else OnnxRuntimeRunner(card, precision)
    from zsadcli.console import log

    log(f"exported {card.method} ({card.format}) runs on {runner.backend}, CPU, {runner.precision}")
    return runner
