"""`zsad prepare`'s logic: run a converter, check the files, write meta.json and its sidecar.

The sidecar ``<root>/.zsad-prepare.json`` records the detected layout variant, counts and skipped
files. It is kept out of meta.json because AdaCLIP's loader copies every top-level key of
meta.json into a dict that only has ``train`` and ``test``.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsadcli import __version__
from zsadcli.atomic import refuse_overwrite, write_text_atomic
from zsadcli.outputs import check_output_dir
from zsadcli.data.converters import CONVERTERS, Converter, LayoutNotFound, Problem
from zsadcli.data.meta import Meta, meta_path, write_meta
from zsadcli.data.validate import validate_items
from zsadcli.errors import BadInput

SIDECAR = ".zsad-prepare.json"
SHOWN_PROBLEMS = 50  # in an error message; --json lists them all


class FileProblems(BadInput):
    """Pairing or file problems; ``problems`` holds all of them."""

    def __init__(self, message: str, problems: list[Problem], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.problems = problems


@dataclass
class PrepareOutcome:
    dataset: str
    root: Path
    variant: str
    meta: Meta
    warnings: list[str] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    meta_file: Path | None = None      # None on --dry-run
    sidecar_file: Path | None = None


def get_converter(name: str) -> Converter:
    if name not in CONVERTERS:
        raise BadInput(f"unknown dataset {name!r}.",
                       hint=f"choose one of: {', '.join(CONVERTERS)} (`zsad prepare --list` describes them)")
    return CONVERTERS[name]


def summarize(meta: Meta) -> list[dict[str, Any]]:
    """One row per split and class: normal, anomalous and with-mask counts."""
    return [{"split": split, "class": cls,
             "normal": sum(1 for it in items if it.anomaly == 0),
             "anomalous": sum(1 for it in items if it.anomaly == 1),
             "with_mask": sum(1 for it in items if it.mask_path)}
            for split, classes in meta.items() for cls, items in classes.items()]


def problem_list(problems: list[Problem]) -> str:
    lines = [f"  {p}" for p in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        lines.append(f"  ... and {len(problems) - SHOWN_PROBLEMS} more (--json lists all)")
    return "\n".join(lines)


def _without(meta: Meta, bad: set[str]) -> Meta:
    return {split: {cls: [it for it in items if it.img_path not in bad and it.mask_path not in bad]
                    for cls, items in classes.items()} for split, classes in meta.items()}


def prepare_dataset(dataset: str, root: str | Path, *, force: bool = False, dry_run: bool = False,
                    skip_bad: bool = False, seed: int | None = None) -> PrepareOutcome:
    """Convert ``root`` with the ``dataset`` converter and (unless ``dry_run``) write meta.json.

    Raises BadInput for an unknown dataset, a missing root, an unmatched layout (with the expected
    tree), an existing meta.json without ``force``, and file problems without ``skip_bad``; nothing
    is written in any of these cases.
    """
    converter = get_converter(dataset)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise BadInput(f"dataset root {root} is not a folder.", hint=f"pass the folder that holds {dataset}")
    if not dry_run:
        refuse_overwrite(meta_path(root), force, "meta.json")
        if root.is_dir() or dataset == "synthetic":  # meta.json (and synthetic's images) must be writable
            check_output_dir(root, "dataset root")
    if converter.generates:
        if dry_run:  # generate where it does no harm, to report what would be written
            with tempfile.TemporaryDirectory(prefix="zsad-dry-run-") as tmp:
                result = converter.convert(Path(tmp), seed=seed or 0)
        else:
            result = converter.convert(root, seed=seed or 0)
        problems: list[Problem] = []
    else:
        if not root.exists():
            raise BadInput(f"dataset root {root} does not exist.", hint=f"pass the folder you unpacked {dataset} into")
        try:
            result = converter.convert(root)
        except LayoutNotFound:
            raise BadInput(f"no known {dataset} layout found in {root}.",
                           hint=f"expected one of these trees:\n{converter.layout}") from None
        problems = result.problems + validate_items(root, result.meta)
    if problems and not skip_bad:
        raise FileProblems(f"{len(problems)} file problem(s) in {root}; nothing written:\n{problem_list(problems)}",
                           problems, hint="fix them, or pass --skip-bad to leave those files out")
    meta = _without(result.meta, {p.path for p in problems})
    if not any(result.meta["test"].values()):
        raise BadInput(f"found no test images for {dataset} in {root} ({result.variant}).",
                       hint=f"expected one of these trees:\n{converter.layout}")
    if not any(meta["test"].values()):
        raise FileProblems(f"every test image of {root} has a problem; nothing written:\n{problem_list(problems)}",
                           problems)
    outcome = PrepareOutcome(dataset, root, result.variant, meta, result.warnings, problems)
    if not dry_run:
        outcome.meta_file = write_meta(root, meta, force=force)
        outcome.sidecar_file = write_text_atomic(root / SIDECAR, json.dumps(sidecar(outcome), indent=2) + "\n")
    return outcome


def sidecar(outcome: PrepareOutcome) -> dict[str, Any]:
    return {"dataset": outcome.dataset, "variant": outcome.variant, "zsad_version": __version__,
            "counts": summarize(outcome.meta), "warnings": outcome.warnings,
            "skipped": [{"path": p.path, "reason": p.reason} for p in outcome.skipped]}
