"""Run folders (``runs/<command>/<name>/``): resolved config, results as JSON and CSV."""
from __future__ import annotations

import csv
import io
import json
import math
import platform
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from zsadcli import __version__
from zsadcli.atomic import write_text_atomic
from zsadcli.errors import BadInput, WriteFailed
from zsadcli.outputs import check_output_dir


def run_dir(command: str, name: str, *, root: str | Path = "runs", force: bool = False, resume: bool = False) -> Path:
    """``runs/<command>/<name>``; an existing non-empty folder needs --force (or --resume).

    Nothing is created here: the writers create the folder when they have a complete file."""
    if not name or "/" in name or name in (".", ".."):
        raise BadInput(f"run name {name!r} is not a plain folder name.")
    path = Path(root) / command / name

    def check() -> None:
        check_output_dir(path, "run folder")  # before any work: a run must be able to save its results
        if path.exists() and any(path.iterdir()) and not (force or resume):
            raise BadInput(f"run folder {path} already exists.",
                           hint="choose another --name, pass --force to overwrite"
                                + (", or --resume" if command in ("train", "eval") else ""))

    from zsadcli.core import distributed

    distributed.from_writer(check)  # rank 0's folder decides, for every rank, before anyone writes
    return path


def environment() -> dict[str, str]:
    import open_clip
    import torch

    return {"zsad": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(_clean(data), indent=2, default=str) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return write_text_atomic(path, buffer.getvalue())


@contextmanager
def results_kept(run: Path, results: Any) -> Iterator[None]:
    """Writing a run folder that fails at the end (disk full, folder made read-only meanwhile) does not
    lose the computed ``results``: they go to a fallback JSON file in the temporary folder (or, if
    that fails too, to stdout), and the error (exit 2) says where."""
    try:
        yield
    except WriteFailed as exc:
        import sys
        import tempfile

        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        fallback = Path(tempfile.gettempdir()) / f"zsad-{run.parent.name}-{run.name}-{stamp}.json"
        try:
            write_json(fallback, results)
            where = str(fallback)
        except (WriteFailed, OSError):
            sys.stdout.write(json.dumps(_clean(results), indent=2, default=str) + "\n")
            where = "stdout (the fallback file could not be written either)"
        raise WriteFailed(f"{exc.message} The computed results were saved to {where}.", hint=exc.hint) from None
