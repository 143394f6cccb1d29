"""Output locations are checked before any work starts, so a run never computes for minutes and
then fails to save: a path that is a file where a folder is needed (or the reverse), or a folder
that cannot be written (permissions, read-only file system), exits 2 at once.

Nothing is created here: the writers (``zsadcli.atomic``) create folders when they have a
complete file to put in them.
"""
from __future__ import annotations

import os
from pathlib import Path

from zsadcli.errors import BadInput


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)  # False on a read-only file system too (EROFS)


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` is, or can be created as, a writable folder."""
    path = Path(path)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise BadInput(f"{what} {path} cannot be a folder{where}.", hint="choose another location")
    if not _writable(existing):
        raise BadInput(f"{what} {path} cannot be written: {existing} is not writable.",
                       hint="choose a writable location (or fix the folder's permissions)")
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` can be written as a file: not a folder, and its folder writable (or creatable)."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{what} {path} is a folder, not a file name.", hint="name a file inside it")
    check_output_dir(path.parent, f"{what} {path}: its folder")
    return path
