"""Train runs: where the trainable parameters start (``--init``) and what a resumed run may change.

A run records in its config.json the settings that decide what is trained (TRAINING_SETTINGS);
``--resume`` continues only with the same ones (``--epochs`` may grow) unless the change is
explicitly allowed, and then config.json lists it under ``resumed``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from zsadcli.core.checkpoints import file_sha256
from zsadcli.errors import BadInput

# config.json keys whose change changes what a run trains (top level, then under "method").
TRAINING_SETTINGS = ("trained_on", "data_root", "items", "batch_size", "lr", "betas", "seed")
METHOD_SETTINGS = ("method", "backbone", "hparams", "ablate", "dtype")


@dataclass(frozen=True)
class InitSource:
    """The weights training starts from: a file as given, or ``released:<registry key>``."""

    path: Path
    source: str
    sha256: str

    def record(self) -> dict[str, str]:
        return {"source": self.source, "path": str(self.path), "sha256": self.sha256}


def resolve_init(cls, path: str | None, train_on: str | None) -> InitSource | None:
    """The ``--init PATH`` / ``--init-train-on DATASET`` choice for method class ``cls``."""
    if path is None and train_on is None:
        return None
    option = "--init" if path is not None else "--init-train-on"
    if cls.recipe is None:
        raise BadInput(f"{cls.name} is training-free: it has no trainable parameters for {option} to set.",
                       hint="use its weights directly with `zsad eval` / `zsad predict`")
    if path is not None and train_on is not None:
        raise BadInput("give --init PATH or --init-train-on DATASET, not both.")
    if train_on is not None:
        from zsadcli.core import hub

        key = cls.released.get(train_on)
        if key is None:
            raise BadInput(f"{cls.name} has no released weights trained on {train_on!r} to start from.",
                           hint=f"released: {', '.join(cls.released) or '(none)'}; or pass --init PATH")
        _, file = hub.resolve_key(key, section="checkpoints")
        return InitSource(Path(file), f"released:{key}", file_sha256(file))
    file = Path(path)
    if not file.is_file():
        raise BadInput(f"--init {file} does not exist.", hint="an authors' .pth or a zsad .safetensors checkpoint")
    return InitSource(file, str(file), file_sha256(file))


def completed_epochs(run: Path) -> int:
    """Epochs a run folder holds a resumable state for (0: none)."""
    import torch

    from zsadcli.core.engine import STATE_FILE

    state = run / STATE_FILE
    if not state.is_file():
        return 0
    try:
        return int(torch.load(state, map_location="cpu", weights_only=True)["epoch"])
    except Exception:
        raise BadInput(f"{state} cannot be read; the run cannot be resumed.",
                       hint="start it again with --force, or under another --name") from None


def previous_config(run: Path) -> dict[str, Any] | None:
    path = run / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise BadInput(f"{path} is not valid JSON; the run cannot be resumed.",
                       hint="start it again with --force, or under another --name") from None


def start_point(run: Path, resume: bool, init: InitSource | None) -> tuple[str | None, dict[str, str] | None, int]:
    """(checkpoint to build the method from, the init to record, epochs already done).

    A resumed run with finished epochs is rebuilt from its last epoch checkpoint (it carries the
    hyperparameters and every tensor), so it needs no ``--init``; one given must be the same file."""
    if not resume:
        return (str(init.path) if init else None), (init.record() if init else None), 0
    previous = previous_config(run) or {}
    recorded = previous.get("init")
    if init is not None and previous and (recorded or {}).get("sha256") != init.sha256:
        started = (f"{recorded['source']} (sha256 {recorded['sha256'][:12]}…)" if recorded
                   else "the method's own random initialisation")
        raise BadInput(f"run {run} started from {started}, not from {init.source} (sha256 {init.sha256[:12]}…).",
                       hint="resume without --init (the run remembers where it started), or start a new run")
    done = completed_epochs(run)
    if done:
        from zsadcli.core.engine import epoch_checkpoint

        return str(epoch_checkpoint(run, done)), recorded, done
    if init is None and recorded:
        file = Path(recorded["path"])
        if not file.is_file() or file_sha256(file) != recorded["sha256"]:
            raise BadInput(f"the init file {file} this run started from is gone or has changed.",
                           hint="pass --init again with the original file")
        init = InitSource(file, recorded["source"], recorded["sha256"])
    return (str(init.path) if init else None), (init.record() if init else None), 0


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # as config.json holds it (tuples -> lists)


def _changes(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """``key: old -> new`` per differing key; dictionaries (hparams) compared key by key."""
    out = []
    for key in keys:
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            out += [f"{key}.{k}: {before.get(k)!r} -> {after.get(k)!r}"
                    for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        elif before != after:
            out.append(f"{key}: {before!r} -> {after!r}")
    return out


def resumed_config(run: Path, config: dict[str, Any], *, done: int, epochs: int,
                   allow_changes: bool) -> dict[str, Any]:
    """The config.json to write when resuming after ``done`` epochs: refuses (exit 2, listing them)
    changes to TRAINING_SETTINGS unless ``allow_changes``, and a smaller ``epochs`` always."""
    previous = previous_config(run)
    if not done or previous is None:
        return config
    if epochs < done:
        raise BadInput(f"run {run} has already trained {done} epochs; --epochs {epochs} would shrink it.",
                       hint=f"--epochs may only grow (at least {done})")
    new = _plain(config)
    old_method, new_method = previous.get("method") or {}, new.get("method") or {}
    changes = _changes(previous, new, TRAINING_SETTINGS) + _changes(old_method, new_method, METHOD_SETTINGS)
    if changes and not allow_changes:
        raise BadInput(f"--resume would change what run {run} trains: {'; '.join(changes)}.",
                       hint="resume with the options the run started with (only --epochs may grow), pass "
                            "--allow-changes to continue anyway, or start a new run under another --name")
    merged = dict(new)
    merged["method"] = {**new_method, "checkpoint": old_method.get("checkpoint"),
                        "checkpoint_format": old_method.get("checkpoint_format")}
    merged["init"] = previous.get("init")
    merged["resumed"] = list(previous.get("resumed") or []) + [{
        "after_epoch": done, "changed": changes,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
    return merged
