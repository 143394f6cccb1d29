"""Issue 12 (hardening), the input/output half: the allowlist unpickler, image decoding by real
range, huge images, rich markup in paths, file modes, messages, overlays, the default ViT-L
source and 80-column tables. Each test reproduces a reported failure as a user would meet it."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from zsadcli.cli import app

TINY = ["--backbone", "tiny-clip", "--image-size", "112", "--device", "cpu"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


# ------------------------------------------------------------------ 1. --allow-pickle runs no code
class _Payload:
    """Pickles as ``call(*args)``: what a crafted checkpoint makes the unpickler do."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _payloads(marker: Path) -> dict[str, object]:
    touch = f"open({str(marker)!r}, 'w').close()"
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    module[0].note = _Payload(os.system, f"touch {marker}")  # deep inside a module, after its tensors
    return {
        "os.system": {"prompt": _Payload(os.system, f"touch {marker}")},
        "builtins.eval": {"prompt": _Payload(eval, touch)},
        "builtins.exec": [torch.zeros(3), _Payload(exec, touch)],
        "subprocess": {"adaptor": _Payload(subprocess.check_call, ["touch", str(marker)])},
        "nested in a tensor container": collections.OrderedDict(
            weight=torch.ones(2, 2), hooks=collections.OrderedDict(h=[torch.zeros(1), _Payload(os.system,
                                                                                                f"touch {marker}")])),
        "nested in a module": module,
    }


def test_allow_pickle_refuses_every_foreign_global_before_calling_it(runner, tmp_path):
    marker = tmp_path / "PWNED"
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), "gray").save(image)
    expected_global = {"os.system": os.system.__module__ + ".system", "builtins.eval": "builtins.eval",
                       "builtins.exec": "builtins.exec", "subprocess": "subprocess.check_call",
                       "nested in a tensor container": ".system", "nested in a module": ".system"}
    for label, payload in _payloads(marker).items():
        evil = tmp_path / f"{label.replace(' ', '_')}.pt"
        torch.save(payload, evil)
        result = runner.invoke(app, ["predict", str(image), "--method", "bsrclip", "--checkpoint", str(evil),
                                     "--allow-pickle", *TINY, "--out", str(tmp_path / f"{label}.png")])
        assert result.exit_code == 2, (label, result.output)
        assert not marker.exists(), f"{label}: the payload ran"
        assert expected_global[label] in result.output and "allowlist" in result.output, (label, result.output)
        assert "Traceback" not in result.output
        assert not (tmp_path / f"{label}.png").exists()
    # the second file of BSR-CLIP's pair is read under the allowlist too
    pair = tmp_path / "pair"
    pair.mkdir()
    torch.save(torch.nn.Parameter(torch.zeros(1, 12, 64)), pair / "mvtec_prompt.pt")
    torch.save(_payloads(marker)["nested in a module"], pair / "mvtec_adaptor.pt")
    result = runner.invoke(app, ["predict", str(image), "--method", "bsrclip", "--checkpoint",
                                 str(pair / "mvtec_prompt.pt"), "--allow-pickle", *TINY, "--json"])
    assert result.exit_code == 2 and not marker.exists() and "mvtec_adaptor.pt" in result.output, result.output


def test_random_file_is_not_a_checkpoint(runner, tmp_path):
    junk = tmp_path / "weights.pth"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    result = runner.invoke(app, ["predict", str(junk), "--checkpoint", str(junk), *TINY])
    assert result.exit_code == 2
    assert "is not a checkpoint" in result.output and "needs code" not in result.output
    assert "--allow-pickle" not in result.output


# ------------------------------------------------------------------ 9. written files respect the umask
def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path):
    from zsadcli.atomic import atomic_path, write_text_atomic

    previous = os.umask(0o027)
    try:
        plain = tmp_path / "plain.txt"
        with open(plain, "w") as fh:
            fh.write("x")
        written = write_text_atomic(tmp_path / "meta.json", "{}")
        with atomic_path(tmp_path / "deep" / "heat.png") as tmp:
            Image.new("RGB", (4, 4)).save(tmp, format="PNG")
        expected = plain.stat().st_mode & 0o777
        assert expected == 0o640
        for path in (written, tmp_path / "deep" / "heat.png"):
            assert path.stat().st_mode & 0o777 == expected, oct(path.stat().st_mode)
        os.chmod(written, 0o600)  # replacing a file keeps its mode, as open(..., "w") keeps it
        write_text_atomic(written, "{}")
        assert written.stat().st_mode & 0o777 == 0o600
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "heat.png", "meta.json", "plain.txt"]
    finally:
        os.umask(previous)
