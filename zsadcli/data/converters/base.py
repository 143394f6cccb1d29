"""The converter contract: a registry of dataset names, what a conversion returns, layout detection.

A converter turns one dataset's raw tree into a :data:`~zsadcli.data.meta.Meta`. It never writes
files (``synthetic`` is the exception: it creates the dataset); writing, validation and the
sidecar are done once, in :mod:`zsadcli.data.prepare`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from zsadcli.data.meta import SPLITS, Meta, MetaItem


@dataclass(frozen=True)
class Problem:
    """A file that cannot go into meta.json as it is; ``path`` is relative to the dataset root."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class ConversionResult:
    meta: Meta
    variant: str
    warnings: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


class LayoutNotFound(Exception):
    """No layout variant of the dataset matched; the caller prints the expected tree."""


class Builder:
    """Collects items, problems and warnings; every path is stored relative to ``root``.

    Variants may sit in a wrapper folder below the root (``BTech_Dataset_transformed/``...); keeping
    the root fixed and the paths relative to it makes ``root + img_path`` resolve either way.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta: Meta = {split: {} for split in SPLITS}
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        self.ignored: set[str] = set()  # non-image files met while listing image folders

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def ensure_class(self, split: str, cls_name: str) -> None:
        self.meta[split].setdefault(cls_name, [])

    def add(self, split: str, cls_name: str, img: Path, mask: Path | None, specie: str, anomaly: int) -> None:
        self.ensure_class(split, cls_name)
        self.meta[split][cls_name].append(
            MetaItem(self.rel(img), self.rel(mask) if mask is not None else "", cls_name, specie, anomaly))

    def problem(self, path: Path, reason: str) -> None:
        self.problems.append(Problem(self.rel(path), reason))

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def result(self, variant: str) -> ConversionResult:
        warnings = list(self.warnings)
        if self.ignored:
            ignored = sorted(self.ignored)
            shown = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
            warnings.append(f"ignored {len(ignored)} non-image file(s): {shown}")
        return ConversionResult(self.meta, variant, warnings, self.problems)


@dataclass(frozen=True)
class Variant:
    """One accepted layout: ``matches(base)`` decides, ``build(builder, base)`` fills the builder."""

    name: str
    matches: Callable[[Path], bool]
    build: Callable[[Builder, Path], None]


def first_match(root: Path, variants: Sequence[Variant], wrappers: Sequence[str] = ()) -> ConversionResult:
    """Try every variant at ``root``, then inside each wrapper folder that exists (archives often
    unpack into one); the first that matches converts. Raises LayoutNotFound otherwise."""
    bases = [(root, "")] + [(root / w, w) for w in wrappers if (root / w).is_dir()]
    for base, wrapper in bases:
        for variant in variants:
            if variant.matches(base):
                builder = Builder(root)
                variant.build(builder, base)
                name = f"{variant.name} (inside {wrapper}/)" if wrapper else variant.name
                return builder.result(name)
    raise LayoutNotFound(root)


@dataclass(frozen=True)
class Converter:
    name: str
    description: str   # one line: the expected layout, for `zsad prepare --list`
    layout: str        # the expected tree(s), printed when no layout matches
    differences: str   # deliberate differences from the official generate_dataset_json script
    convert: Callable[..., ConversionResult]
    generates: bool    # creates the dataset itself (synthetic); takes a seed


CONVERTERS: dict[str, Converter] = {}


def register(name: str, *, description: str, layout: str, differences: str = "",
             generates: bool = False) -> Callable[[Callable[..., ConversionResult]], Callable[..., ConversionResult]]:
    """Decorator adding a module's ``convert`` to :data:`CONVERTERS` under ``name``."""

    def decorate(convert: Callable[..., ConversionResult]) -> Callable[..., ConversionResult]:
        if name in CONVERTERS:
            raise ValueError(f"converter {name!r} registered twice")
        CONVERTERS[name] = Converter(name, description, layout.strip("\n"), differences, convert, generates)
        return convert

    return decorate
