"""The weights registry (weights.yaml): resolution, download, checksum verification.

Every file zsad loads from the network is named in the registry with a pinned source and a
digest. Files land in the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE`` honoured) or, for
plain URLs, in ``$ZSAD_CACHE`` (default ``$HF_HOME/zsad``). A file is re-hashed on every
cache hit: a corrupted cache must never be scored with.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from zsadcli.errors import BadInput, ChecksumMismatch, WeightsUnavailable

PACKAGE_REGISTRY = Path(__file__).resolve().parent.parent / "weights.yaml"
SECTIONS = ("backbones", "checkpoints", "auxiliary")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class WeightEntry:
    """One registry entry; ``extra`` keeps method-specific fields (method, trained_on, ...)."""

    key: str
    section: str
    source: str  # "hf" or "url"
    description: str = ""
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    url: str | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    git_blob: str | None = None
    size: int | None = None
    format: str = "state-dict"
    licence: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def display_source(self) -> str:
        if self.source == "hf":
            return f"hf://{self.repo_id}/{self.filename}@{self.revision or 'main'}"
        return str(self.url)

    def fetch_command(self) -> str:
        """The exact command that puts this file in the cache on a machine with internet."""
        cmd = f"zsad weights download {self.key}"
        if self.source == "hf":
            cmd += (f"   (or: hf download {self.repo_id} {self.filename}"
                    f" --revision {self.revision or 'main'})")
        else:
            cmd += f"   (or fetch {self.url})"
        return cmd


_KNOWN_FIELDS = {f for f in WeightEntry.__dataclass_fields__ if f not in ("key", "section", "extra")}


def _parse_registry(path: Path) -> dict[str, WeightEntry]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BadInput(f"weights registry {path} cannot be read: {exc}",
                       hint="fix the YAML or remove the file from ZSAD_REGISTRY") from None
    entries: dict[str, WeightEntry] = {}
    for section in SECTIONS:
        for key, spec in (data.get(section) or {}).items():
            if not isinstance(spec, dict) or spec.get("source") not in ("hf", "url"):
                raise BadInput(f"weights registry {path}: entry {key!r} needs `source: hf` or `source: url`.")
            known = {k: v for k, v in spec.items() if k in _KNOWN_FIELDS}
            extra = {k: v for k, v in spec.items() if k not in _KNOWN_FIELDS}
            for digest in ("sha256", "sha256_prefix", "git_blob"):
                if known.get(digest):
                    known[digest] = str(known[digest]).lower()
            entries[key] = WeightEntry(key=key, section=section, extra=extra, **known)
    return entries


def registry_files() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("ZSAD_REGISTRY", "").split(os.pathsep) if p]
    return [PACKAGE_REGISTRY, *extra]


def load_registry() -> dict[str, WeightEntry]:
    """The packaged registry merged with any files named in ``ZSAD_REGISTRY``."""
    merged: dict[str, WeightEntry] = {}
    for path in registry_files():
        if not path.is_file():
            raise BadInput(f"weights registry {path} does not exist.",
                           hint="check the ZSAD_REGISTRY environment variable")
        merged.update(_parse_registry(path))
    return merged


def get_entry(key: str, section: str | None = None) -> WeightEntry:
    registry = load_registry()
    entry = registry.get(key)
    if entry is None or (section and entry.section != section):
        names = sorted(k for k, e in registry.items() if not section or e.section == section)
        raise BadInput(f"no weights named {key!r} in the registry.",
                       hint=f"known: {', '.join(names) or '(none)'}; see `zsad weights list`")
    return entry


# ---------------------------------------------------------------- cache locations
def hf_cache_dir() -> Path:
    """Read at call time (not import time) so HF_HOME/HF_HUB_CACHE set later are honoured."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def zsad_cache_dir() -> Path:
    if os.environ.get("ZSAD_CACHE"):
        return Path(os.environ["ZSAD_CACHE"]).expanduser()
    return hf_cache_dir().parent / "zsad"


def is_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "ZSAD_OFFLINE"))


def _url_cache_path(entry: WeightEntry) -> Path:
    pin = entry.sha256 or entry.git_blob or entry.sha256_prefix or "unpinned"
    name = entry.filename or Path(str(entry.url)).name
    return zsad_cache_dir() / "url" / pin[:16] / name


def cached_path(entry: WeightEntry) -> Path | None:
    """Where the file sits in the cache, without touching the network; None when absent."""
    if entry.source == "hf":
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(entry.repo_id, entry.filename, cache_dir=str(hf_cache_dir()),
                                       revision=entry.revision)
        return Path(found) if isinstance(found, str) and os.path.exists(found) else None
    path = _url_cache_path(entry)
    return path if path.is_file() else None


# ---------------------------------------------------------------- verification
def file_digests(path: Path, want_git_blob: bool = False) -> dict[str, str]:
    """sha256 (and the git blob id when asked) in one pass over the file."""
    sha = hashlib.sha256()
    blob = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()) if want_git_blob else None
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
            if blob is not None:
                blob.update(chunk)
    out = {"sha256": sha.hexdigest()}
    if blob is not None:
        out["git_blob"] = blob.hexdigest()
    return out


@dataclass(frozen=True)
class Verification:
    ok: bool
    basis: str  # what the file was checked against
    expected: str
    actual: str


def verify(entry: WeightEntry, path: Path) -> Verification:
    """Check ``path`` against the strongest digest known for ``entry``."""
    digests = file_digests(path, want_git_blob=bool(entry.git_blob))
    if entry.sha256:
        return Verification(digests["sha256"] == entry.sha256, "registry sha256", entry.sha256, digests["sha256"])
    if entry.git_blob:
        return Verification(digests["git_blob"] == entry.git_blob, "registry git blob id",
                            entry.git_blob, digests["git_blob"])
    if entry.sha256_prefix:
        return Verification(digests["sha256"].startswith(entry.sha256_prefix), "registry sha256 prefix",
                            entry.sha256_prefix, digests["sha256"])
    # No published digest: the Hub names LFS blobs by their sha256 and git-stored files by their
    # git blob id, so the cache itself carries the expected digest of what was downloaded.
    blob_name = Path(os.path.realpath(path)).name
    if _HEX64.match(blob_name):
        return Verification(digests["sha256"] == blob_name, "hub LFS sha256", blob_name, digests["sha256"])
    if _HEX40.match(blob_name):
        actual = file_digests(path, want_git_blob=True)["git_blob"]
        return Verification(actual == blob_name, "hub git blob id", blob_name, actual)
    return Verification(False, "no digest known", "", digests["sha256"])


def _check(entry: WeightEntry, path: Path) -> Path:
    result = verify(entry, path)
    if not result.ok:
        raise ChecksumMismatch(
            f"{path} does not match the {result.basis} of weights {entry.key!r} "
            f"(expected {result.expected}, got {result.actual}).",
            hint=f"delete the file and run: {entry.fetch_command()}")
    return path


# ---------------------------------------------------------------- download
def _download_hf(entry: WeightEntry) -> Path:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(entry.repo_id, entry.filename, revision=entry.revision,
                           cache_dir=str(hf_cache_dir()))
    return Path(path)


def _download_url(entry: WeightEntry) -> Path:
    from rich.markup import escape
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from zsadcli.atomic import atomic_path
    from zsadcli.console import err_console

    target = _url_cache_path(entry)
    with atomic_path(target) as tmp:  # the cache file gets the umask's mode, like any download
        with open(tmp, "wb") as out, urllib.request.urlopen(entry.url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), console=err_console, transient=True,
                          disable=err_console.quiet or not err_console.is_terminal) as bar:
                task = bar.add_task(escape(f"downloading {target.name}"), total=total)
                shutil.copyfileobj(_ProgressReader(resp, bar, task), out, 1 << 20)
    return target


class _ProgressReader:
    def __init__(self, raw, bar, task):
        self.raw, self.bar, self.task = raw, bar, task

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.bar.advance(self.task, len(data))
        return data


def resolve(entry: WeightEntry, *, download: bool = True, fallback: bool = True) -> Path:
    """Return a verified local path for ``entry``: cache hit (re-hashed) or fresh download.

    Offline with a cache miss -> exit 3 naming the command that would fetch it (after trying the
    entry's ``fallback`` key, if it names one: another file with the same tensors);
    digest mismatch -> exit 4 naming the file.
    """
    try:
        return _resolve_one(entry, download)
    except WeightsUnavailable as missing:
        alternative = entry.extra.get("fallback")
        if not (fallback and alternative):
            raise
        try:
            return resolve(get_entry(str(alternative)), download=download)
        except WeightsUnavailable:
            raise missing from None


def _resolve_one(entry: WeightEntry, download: bool) -> Path:
    path = cached_path(entry)
    if path is not None:
        return _check(entry, path)
    if is_offline() or not download:
        where = hf_cache_dir() if entry.source == "hf" else zsad_cache_dir()
        raise WeightsUnavailable(
            f"weights {entry.key!r} ({entry.display_source}) are not in the cache at {where}"
            + (" and HF_HUB_OFFLINE=1 forbids downloading." if is_offline() else "."),
            hint=f"on a machine with internet run: {entry.fetch_command()}; then copy the cache "
                 "folder here, or pass a local file (--backbone-file / --checkpoint)")
    try:
        path = _download_hf(entry) if entry.source == "hf" else _download_url(entry)
    except Exception as exc:  # network/HTTP errors; huggingface_hub raises its own hierarchy
        raise WeightsUnavailable(f"downloading weights {entry.key!r} from {entry.display_source} failed: {exc}",
                                 hint=f"retry, or fetch it elsewhere: {entry.fetch_command()}") from None
    return _check(entry, path)


def resolve_key(key: str, section: str | None = None) -> tuple[WeightEntry, Path]:
    entry = get_entry(key, section)
    return entry, resolve(entry)


def status(entries: Iterable[WeightEntry], *, check: bool) -> list[dict[str, Any]]:
    """Presence (and, with ``check``, verification) of each entry, for `weights list/verify` and doctor."""
    rows = []
    for entry in entries:
        path = cached_path(entry)
        row: dict[str, Any] = {"key": entry.key, "section": entry.section, "source": entry.display_source,
                               "path": str(path) if path else None, "present": path is not None}
        if path is not None and check:
            result = verify(entry, path)
            row.update(verified=result.ok, basis=result.basis)
        rows.append(row)
    return rows
