"""Method checkpoints: our safetensors format (tensors + metadata) and the authors' formats.

Ours: safetensors whose metadata holds ``zsad_format``, ``method``, ``backbone``,
``trained_on``, ``hparams`` (JSON), ``epoch``, ``zsad_version`` and, for runs started from
other weights (``zsad train --init``), ``init`` (JSON: source and sha256). Authors' files are torch
pickles of plain tensors, read with ``weights_only=True``. Under ``--allow-pickle`` a strict
allowlist unpickler also restores the few classes authors' whole-object pickles name (BSR-CLIP's
Adaptor); any other global is refused before it is called, so no code from the file runs.
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
    """Read a checkpoint; ``allow_pickle`` (explicit opt-in) also restores the allowlisted classes of
    authors' whole-object pickles (``PICKLE_STANDINS`` and plain torch modules), nothing else."""
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
    raw = _load_torch_pickle(path, allow_pickle)
    return LoadedCheckpoint(path, "authors", None, raw=raw)


# Classes that authors' whole-object pickles name but zsad does not ship, e.g. BSR-CLIP's
# ``clip.adaptor.Adaptor``: (module, name) -> a stand-in class (an nn.Module subclass restores a
# module's parameters and children as is). Consulted only under allow_pickle.
PICKLE_STANDINS: dict[tuple[str, str], type] = {}

# Everything else an allowlisted pickle may name: torch's tensor/parameter rebuild functions, the
# containers nn.Module pickles use, and the plain torch layers authors' modules are built from.
# Each is harmless to call with any arguments (the pickle VM may call what find_class returns).
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"), ("torch", "device"),
    ("torch.nn.modules.linear", "Linear"), ("torch.nn.modules.linear", "Identity"),
    ("torch.nn.modules.normalization", "LayerNorm"), ("torch.nn.modules.dropout", "Dropout"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.activation", "GELU"),
})


class ForbiddenGlobal(Exception):
    """A pickle names a global outside the allowlist (raised before anything is called)."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


def _allowed_global(module: str, name: str):
    """The object for an allowlisted (module, name); ForbiddenGlobal for anything else."""
    import _compat_pickle

    # protocol-2 pickles (torch.save's default) spell names the Python 2 way: __builtin__.set,
    # commands.check_call for subprocess.check_call; map them back as pickle itself would
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    standin = PICKLE_STANDINS.get((module, name))
    if standin is not None:
        return standin
    if (module, name) in _ALLOWED_GLOBALS:
        import importlib

        return getattr(importlib.import_module(module), name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    raise ForbiddenGlobal(module, name)


def _allowlist_pickle():
    """A ``pickle`` module whose Unpickler resolves only allowlisted globals (torch.load takes it as
    ``pickle_module``; torch resolves storage types itself before asking us)."""
    import pickle
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            return _allowed_global(module, name)

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    def loads(data, **kwargs):
        import io

        return Unpickler(io.BytesIO(data), **kwargs).load()

    shim = types.ModuleType("zsad_allowlist_pickle")
    shim.__dict__.update({k: v for k, v in vars(pickle).items() if not k.startswith("__")})
    # torch's legacy (non-zip) format reads its header pickles with pickle_module.load: those too
    shim.Unpickler, shim.load, shim.loads = Unpickler, load, loads
    return shim


_NOT_A_CHECKPOINT_HINT = "give a zsad .safetensors written by `zsad train` or the authors' released .pth"


def _load_torch_pickle(path: Path, allow_pickle: bool) -> Any:
    """The content of a torch file: plain tensors (weights-only), or with ``allow_pickle`` the
    allowlisted objects too. Files that are no torch file at all are "not a checkpoint"."""
    import pickle

    try:
        if allow_pickle:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_allowlist_pickle())
        return torch.load(path, map_location="cpu", weights_only=True)
    except ForbiddenGlobal as exc:
        raise BadInput(f"checkpoint {path} names the Python global {exc.qualified}, which is not on zsad's "
                       "allowlist; it was refused before anything from the file ran.",
                       hint="--allow-pickle restores only torch tensors, plain torch layers and BSR-CLIP's "
                            "Adaptor classes; this file is something else (do not trust it)") from None
    except Exception as exc:
        text = str(exc)
        needs_objects = isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in text
        if needs_objects:
            named = text.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in text else "?"
            raise BadInput(f"checkpoint {path} holds pickled Python objects ({named}), not only tensors.",
                           hint="zsad reads such files only with --allow-pickle (where a method offers it), and "
                                "then only the allowlisted classes of the authors' files") from None
        raise BadInput(f"{path} is not a checkpoint: neither a safetensors file nor a readable torch file "
                       f"({_first_line(text) or type(exc).__name__}).", hint=_NOT_A_CHECKPOINT_HINT) from None


def _first_line(text: str) -> str:
    """The telling line of a torch.load error (its weights-only errors bury it after a preamble)."""
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line.split(". ", 1)[0].rstrip(".")[:120]
