"""Offline test harness: a tiny seeded CLIP in a Hugging Face cache, found through weights.yaml
(via ZSAD_REGISTRY) exactly as a user's download would be; HF_HUB_OFFLINE=1 throughout."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub (it reads these at import time).
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="zsad-tests-"))
os.environ["HF_HOME"] = str(_SESSION_HOME / "hf")
os.environ["HF_HUB_CACHE"] = str(_SESSION_HOME / "hf" / "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["ZSAD_CACHE"] = str(_SESSION_HOME / "zsad")

import pytest  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tinyclip import TINY_FILE, TINY_REPO, TINY_REVISION, install_in_hf_cache, sha256_of, tiny_state_dict  # noqa: E402


@pytest.fixture(scope="session")
def tiny_registry() -> dict:
    """Install the tiny CLIP into the session's HF cache and register it as `tiny-clip`."""
    staging = _SESSION_HOME / "staging"
    staging.mkdir(exist_ok=True)
    payload = staging / TINY_FILE
    save_file(tiny_state_dict(seed=0), str(payload))
    cached = install_in_hf_cache(Path(os.environ["HF_HUB_CACHE"]), TINY_REPO, TINY_FILE, TINY_REVISION, payload)
    registry = {"backbones": {"tiny-clip": {
        "description": "tiny seeded CLIP for tests", "source": "hf", "repo_id": TINY_REPO,
        "filename": TINY_FILE, "revision": TINY_REVISION, "sha256": sha256_of(payload),
        "format": "state-dict", "quick_gelu": True}}}
    path = _SESSION_HOME / "test-registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    os.environ["ZSAD_REGISTRY"] = str(path)  # for module/session fixtures built before monkeypatch runs
    return {"registry": path, "payload": payload, "cached": cached, "sha256": sha256_of(payload)}


@pytest.fixture(autouse=True)
def _offline_registry(monkeypatch, tiny_registry):
    monkeypatch.setenv("ZSAD_REGISTRY", str(tiny_registry["registry"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic MVTec-style dataset with its meta.json (shared, read-only)."""
    from zsadcli.data.meta import write_meta
    from zsadcli.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_meta(root, generate_synthetic(root, seed=0, size=64))
    return root


@pytest.fixture(scope="session")
def b16plus_file(tmp_path_factory) -> Path:
    """The tiny ViT-B-16-plus-240-shaped GELU CLIP (WinCLIP, CLIP-AD) as a plain state-dict file."""
    from tiny_b16plus import save_tiny_b16plus

    return save_tiny_b16plus(tmp_path_factory.mktemp("b16plus") / "tiny_b16plus.pt")


@pytest.fixture(scope="session")
def clip():
    """The same model as an open_clip module, for the reference re-statements."""
    from tiny_b16plus import build_tiny_b16plus

    return build_tiny_b16plus(0)
