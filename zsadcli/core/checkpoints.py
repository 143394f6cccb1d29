"""Method checkpoints: our safetensors format (tensors + metadata) and the authors' formats.

Ours: safetensors whose metadata holds ``zsad_format``, ``method``, ``backbone``,
``trained_on``, ``hparams`` (JSON), ``epoch``, ``zsad_version`` and, for runs started from
other weights (``zsad train --init``), ``init`` (JSON: source and sha256). Authors' files are torch
pickles of plain tensors, read with ``weights_only=True`` (pickles that need code are refused).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zsadcli import __version__
from zsadcli.atomic import atomic_path
from zsadcli.errors import BadInput

FORMAT_VERSION = "1"


@dataclass
class LoadedCheckpoint:
    path: Path
    kind: str  # "zsad" or "authors"
    method: str | None
    hparams: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] | None = None  # ours
    raw: Any = None  # authors'


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], *, method: str, backbone: str,
                    trained_on: str, hparams: dict[str, Any], epoch: int | None = None,
                    init: dict[str, Any] | None = None) -> Path:
    """Write atomically (a crash never leaves a half-written checkpoint). ``init``: where training
    started from (``{"source", "sha256", ...}``), kept as JSON in the ``init`` metadata field."""
    from safetensors.torch import save_file

    metadata = {"zsad_format": FORMAT_VERSION, "method": method, "backbone": backbone,
                "trained_on": trained_on, "hparams": json.dumps(hparams, default=list),
                "zsad_version": __version__, "epoch": "" if epoch is None else str(epoch)}
    if init is not None:
        metadata["init"] = json.dumps(init)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> LoadedCheckpoint:
    """Read a checkpoint; ``allow_pickle`` (explicit, unsafe) permits pickles that run code."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"checkpoint {path} does not exist.", hint="check the path given to --checkpoint")
    if path.stat().st_size == 0:
        raise BadInput(f"checkpoint {path} is an empty file.")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[8:9] == b"{":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as exc:
            raise BadInput(f"checkpoint {path} is not a readable safetensors file ({exc}).") from None
        if metadata.get("zsad_format") != FORMAT_VERSION or "method" not in metadata:
            raise BadInput(f"checkpoint {path} is a safetensors file without zsad metadata.",
                           hint="zsad checkpoints are written by `zsad train`; authors' .pth files load too")
        return LoadedCheckpoint(path, "zsad", metadata["method"], json.loads(metadata.get("hparams") or "{}"),
                                metadata, tensors=tensors)
    try:
        if allow_pickle:
            raw = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_standin_pickle())
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        import pickle

        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc):
            detail = "it is a pickle that needs code to load"
        else:
            detail = f"{type(exc).__name__}: {str(exc)[:160]}"
        raise BadInput(f"checkpoint {path} cannot be read as a {'' if allow_pickle else 'weights-only '}torch file "
                       f"({detail}).",
                       hint="zsad refuses pickles that need code to load; --allow-pickle (where a method offers "
                            "it) loads them, but unpickling runs code from the file: only for files you trust") from None
    return LoadedCheckpoint(path, "authors", None, raw=raw)


# Classes that authors' whole-object pickles name but zsad does not ship, e.g. BSR-CLIP's
# ``clip.adaptor.Adaptor``: (module, name) -> a stand-in class (an nn.Module subclass restores a
# module's parameters and children as is). Consulted only under allow_pickle.
PICKLE_STANDINS: dict[tuple[str, str], type] = {}


def _standin_pickle():
    """A ``pickle`` module whose Unpickler resolves PICKLE_STANDINS first."""
    import pickle
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            standin = PICKLE_STANDINS.get((module, name))
            return standin if standin is not None else super().find_class(module, name)

    shim = types.ModuleType("zsad_standin_pickle")
    shim.__dict__.update({k: v for k, v in vars(pickle).items() if not k.startswith("__")})
    shim.Unpickler = Unpickler
    return shim
