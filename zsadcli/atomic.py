"""Write files so that a crash or an error never leaves a partial file behind."""
from __future__ import annotations

import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from zsadcli.errors import BadInput, WriteFailed


def refuse_overwrite(path: Path, force: bool, what: str) -> None:
    """Users' meta.json, checkpoints and results are never replaced without --force."""
    if path.exists() and not force:
        raise BadInput(f"{what} {path} already exists.", hint="pass --force to replace it")


def _create_temp_beside(target: Path) -> Path:
    """A new empty file next to ``target`` with the mode a plain ``open(target, "w")`` would give it:
    0666 minus the umask (``mkstemp``'s 0600 would make users' outputs private), or the mode of
    the file it replaces."""
    mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else 0o666
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # the umask applies here
        except FileExistsError:
            continue
        if target.is_file():
            os.fchmod(fd, mode)  # an existing file keeps its mode, as open(..., "w") keeps it
        os.close(fd)
        return tmp


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only on success.

    A failed write (disk full, permissions) raises WriteFailed (exit 2) naming ``target`` and
    leaves nothing behind: no temporary file, no folder created for it."""
    target = Path(target)
    missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp_beside(target)
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        _discard(tmp, missing)
        raise WriteFailed.of(target, exc) from None
    finally:
        _discard(tmp, [])


def _discard(tmp: Path | None, folders: list[Path]) -> None:
    """Remove a temporary file and the (then empty) folders made for it, deepest first."""
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)
