"""Resumable eval: each finished class's result is kept in the run folder, so an eval stopped at
class 11 of 12 (Ctrl-C, SIGTERM, a lost node) goes on with ``--resume`` where it stopped and ends
with the metrics.json an uninterrupted run writes.

Layout: ``RUN/partial/run.json`` (schema, and the settings the results depend on) and
``RUN/partial/<dataset>/<class>.json`` (one class's result, written atomically by rank 0). The
folder goes once metrics.json is written; a run folder never holds a partial metrics.json or
per_class.csv.
"""
from __future__ import annotations

import json
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from zsadcli.atomic import write_text_atomic
from zsadcli.core import distributed
from zsadcli.console import esc, log
from zsadcli.errors import BadInput, WriteFailed, ZsadError

SCHEMA = 1
PARTIAL = "partial"
RESULT_FILES = ("metrics.json", "per_class.csv")  # metrics.json is written last: it marks a complete run


class Interrupted(ZsadError):
    """Ctrl-C or SIGTERM during a resumable run: what finished is kept; the hint resumes."""

    exit_code = 130  # 128 + SIGINT, the shell's convention


def _file_name(name: str) -> str:
    return name.replace("/", "_") + ".json"


class ClassResults:
    """The finished classes of one eval run folder. Every rank may call every method: rank 0
    reads and writes, the others receive what rank 0 read."""

    def __init__(self, run: Path, settings: dict[str, Any], *, resume: bool) -> None:
        self.run = Path(run)
        self.folder = self.run / PARTIAL
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from disk
        self.resume = resume
        self.unsaved = False  # set when saving a class failed: no further tries
        distributed.from_writer(self._open)
        _hold(self.run)

    def _open(self) -> None:
        header = self.folder / "run.json"
        if not self.resume:  # a --force rerun starts afresh: no stale results next to the new ones
            shutil.rmtree(self.folder, ignore_errors=True)
            for name in RESULT_FILES:
                (self.run / name).unlink(missing_ok=True)
            return
        if (self.run / "metrics.json").is_file() and not self.folder.exists():
            raise BadInput(f"eval run {self.run} is complete: nothing to resume.",
                           hint="pass --force (without --resume) to evaluate it again, or choose another --name")
        if header.is_file():
            stored = json.loads(header.read_text())
            if stored.get("schema") != SCHEMA:
                raise BadInput(f"{header} was written by another zsad version (schema {stored.get('schema')}).",
                               hint="rerun with --force instead of --resume")
            if stored.get("settings") != self.settings:
                changed = sorted(k for k in set(stored.get("settings", {})) | set(self.settings)
                                 if stored.get("settings", {}).get(k) != self.settings.get(k))
                raise BadInput(f"--resume of {self.run} with other settings ({', '.join(changed)}) than the "
                               "interrupted run.", hint="resume with the same options, or rerun with --force")

    def _header(self) -> None:
        header = self.folder / "run.json"
        if not header.is_file():
            write_text_atomic(header, json.dumps({"schema": SCHEMA, "settings": self.settings}, indent=2) + "\n")

    def finished(self, dataset: str) -> dict[str, dict[str, Any]]:
        """Class -> stored result for ``dataset`` (empty without --resume)."""
        if not self.resume:
            return {}

        def read() -> dict[str, dict[str, Any]]:
            folder = self.folder / dataset
            if not folder.is_dir():
                return {}
            # json reads back NaN (undefined metrics) and every float exactly as it was written
            return {data["class"]: data["result"] for data in
                    (json.loads(p.read_text()) for p in sorted(folder.glob("*.json")))}

        return distributed.from_writer(read)

    def save(self, dataset: str, cls: str, result: dict[str, Any]) -> None:
        """Keep a finished class for --resume. A class that cannot be kept (disk full) costs only the
        ability to resume: the eval goes on, warns once, and its end still saves the results."""
        if not distributed.is_writer() or self.unsaved:
            return
        try:
            self._header()
            write_text_atomic(self.folder / dataset / _file_name(cls),
                              json.dumps({"class": cls, "result": result}, default=_plain) + "\n")
        except WriteFailed as exc:
            self.unsaved = True
            log(f"[yellow]warning:[/] finished classes cannot be kept for --resume ({esc(exc.message)}); "
                "the eval goes on")

    def close(self) -> None:
        """After metrics.json is written: the partial results are no longer needed."""
        if distributed.is_writer():
            shutil.rmtree(self.folder, ignore_errors=True)
        release()


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)  # numpy values as Python ones


def resume_command(run: Path) -> str:
    """The command line that resumes this run: the one given, with --name and --resume, without --force."""
    args = sys.argv[1:] if "eval" in sys.argv[1:] else ["eval", "…"]
    args = [a for a in args if a not in ("--force", "--resume")]
    if "--name" not in args and not any(a.startswith("--name=") for a in args):
        args += ["--name", run.name]
    line = "zsad " + " ".join(shlex.quote(a) if a != "…" else a for a in args) + " --resume"
    if distributed.world().sharded:
        line += "   (under torchrun: your torchrun line with these arguments)"
    return line


def _sigterm_to_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


_open_run: dict[str, Any] = {}  # the run a Ctrl-C / SIGTERM would interrupt, and the SIGTERM handler it replaced


def _hold(run: Path) -> None:
    """From now on SIGTERM ends the command like Ctrl-C, and either names the resume command."""
    release()
    _open_run["run"] = run
    if threading.current_thread() is threading.main_thread():
        _open_run["sigterm"] = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)


def release() -> None:
    """The command ended: SIGTERM's handler is restored (commands.common.guard calls this)."""
    previous = _open_run.pop("sigterm", None)
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    _open_run.pop("run", None)


def note_kept() -> None:
    """After an error: say that the finished classes are kept, and how to go on once it is fixed."""
    run = _open_run.get("run")
    if run is not None and any((run / PARTIAL).glob("*/*.json")):
        from zsadcli.console import err_console

        err_console.print(f"the finished classes are kept in {run / PARTIAL}; once fixed, resume with: "
                          f"{resume_command(run)}", highlight=False, markup=False, soft_wrap=True)


def interrupted() -> Interrupted | None:
    """The error to end an interrupted command with, if a resumable run is open (else None)."""
    run = _open_run.get("run")
    if run is None:
        return None
    if distributed.is_writer() and not (run / "metrics.json").exists():
        (run / "per_class.csv").unlink(missing_ok=True)  # stopped between the two writes: no half a result
    return Interrupted(f"eval interrupted; the finished classes are kept in {run / PARTIAL}.",
                       hint=f"resume with: {resume_command(run)}")
