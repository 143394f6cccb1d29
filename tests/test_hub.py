"""weights.yaml resolution through the real hub path, offline: hits, misses, corruption."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from zsadcli.cli import app
from zsadcli.core import hub
from zsadcli.errors import ChecksumMismatch, WeightsUnavailable
from tinyclip import TINY_FILE, TINY_REPO, TINY_REVISION, install_in_hf_cache


def test_packaged_registry_has_the_backbones():
    registry = hub.load_registry()
    vitl = registry["openai-vit-l-14-336"]  # the default: open_clip's own Hub copy, pinned and hashed
    assert (vitl.repo_id, vitl.filename) == ("timm/vit_large_patch14_clip_336.openai", "open_clip_model.safetensors")
    assert vitl.revision == "81e38efc4637de5023b10e75a7f9bd1c6fa6b010"
    assert vitl.sha256 == "fbc415c3d0d7b79faed8f5ccfb740c32b7c4f5ffe7283b851f89c6231c01a8e0"
    assert vitl.format == "state-dict" and vitl.extra["quick_gelu"] is True
    fallback = registry[vitl.extra["fallback"]]
    assert (fallback.repo_id, fallback.filename, fallback.revision) == (
        vitl.repo_id, "open_clip_pytorch_model.bin", vitl.revision)
    for key in ("openai-vit-l-14-336-mirror", "openai-vit-l-14-336-openai-url"):  # documented alternatives
        alternative = registry[key]
        assert alternative.sha256 == "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"
        assert alternative.format == "openai-torchscript" and alternative.extra["quick_gelu"] is True
    assert registry["openai-vit-l-14-336-mirror"].repo_id == "cubert-gmbh/clip"
    assert registry["openai-vit-l-14-336-openai-url"].url.startswith("https://openaipublic.azureedge.net/clip/")
    plus = registry["laion-vit-b-16-plus-240"]
    assert plus.extra["quick_gelu"] is False and plus.source == "hf"


def test_tiny_entry_resolves_offline_and_verifies(tiny_registry):
    entry, path = hub.resolve_key("tiny-clip")
    assert Path(path).resolve() == Path(tiny_registry["cached"]).resolve()
    result = hub.verify(entry, path)
    assert result.ok and result.basis == "registry sha256"


def test_offline_miss_exits_3_with_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    result = CliRunner().invoke(app, ["weights", "download", "openai-vit-l-14-336"])
    assert result.exit_code == 3, result.output
    assert "zsad weights download openai-vit-l-14-336" in result.output
    assert "timm/vit_large_patch14_clip_336.openai" in result.output and "Traceback" not in result.output


def _corrupt_copy_of_tiny(tmp_path, monkeypatch, tiny_registry) -> Path:
    cache = tmp_path / "hub"
    link = install_in_hf_cache(cache, TINY_REPO, TINY_FILE, TINY_REVISION, tiny_registry["payload"])
    blob = link.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return blob


def test_corrupt_cache_hit_exits_4_naming_the_file(tmp_path, monkeypatch, tiny_registry):
    blob = _corrupt_copy_of_tiny(tmp_path, monkeypatch, tiny_registry)
    with pytest.raises(ChecksumMismatch):
        hub.resolve_key("tiny-clip")
    result = CliRunner().invoke(app, ["weights", "download", "tiny-clip"])
    assert result.exit_code == 4, result.output
    assert TINY_FILE in result.output or blob.name in result.output
    assert CliRunner().invoke(app, ["weights", "verify", "tiny-clip"]).exit_code == 4


def test_without_registered_digest_the_hub_lfs_name_is_the_check(tmp_path, monkeypatch, tiny_registry):
    registry = yaml.safe_load(Path(tiny_registry["registry"]).read_text())
    del registry["backbones"]["tiny-clip"]["sha256"]
    path = tmp_path / "nodigest.yaml"
    path.write_text(yaml.safe_dump(registry))
    monkeypatch.setenv("ZSAD_REGISTRY", str(path))
    entry, resolved = hub.resolve_key("tiny-clip")
    assert hub.verify(entry, resolved).basis == "hub LFS sha256"
    _corrupt_copy_of_tiny(tmp_path, monkeypatch, tiny_registry)
    with pytest.raises(ChecksumMismatch):
        hub.resolve_key("tiny-clip")


def test_url_entry_git_blob_verification(tmp_path, monkeypatch):
    payload = b"released prompt checkpoint bytes"
    blob_id = hashlib.sha1(b"blob %d\0" % len(payload) + payload).hexdigest()
    registry = {"checkpoints": {"demo": {"source": "url", "url": "https://example.invalid/x/epoch_15.pth",
                                         "git_blob": blob_id}}}
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(registry))
    monkeypatch.setenv("ZSAD_REGISTRY", str(path))
    entry = hub.get_entry("demo")
    with pytest.raises(WeightsUnavailable):
        hub.resolve(entry)  # offline, not cached
    target = hub._url_cache_path(entry)
    target.parent.mkdir(parents=True)
    target.write_bytes(payload)
    assert hub.resolve(entry) == target
    assert hub.verify(entry, target).basis == "registry git blob id"
    target.write_bytes(payload + b"!")
    with pytest.raises(ChecksumMismatch):
        hub.resolve(entry)


def test_weights_list_json(tiny_registry):
    result = CliRunner().invoke(app, ["weights", "list", "--json"])
    assert result.exit_code == 0
    rows = {row["key"]: row for row in json.loads(result.stdout)}
    assert rows["tiny-clip"]["present"] is True
    assert rows["openai-vit-l-14-336"]["present"] is False


def test_unknown_key_is_bad_input():
    assert CliRunner().invoke(app, ["weights", "download", "no-such-weights"]).exit_code == 2
