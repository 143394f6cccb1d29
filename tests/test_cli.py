"""The CLI shell: commands, help, global options, exit codes."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from zsadcli.cli import app

COMMANDS = ("prepare", "train", "eval", "predict", "ablate", "weights", "doctor")


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def test_help_lists_all_commands(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(runner, command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.splitlines()) > 4


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("zsad ")


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "tpu"])
def test_absent_device_is_a_usage_error(runner, device):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    for args in (["--device", device, "doctor"], ["doctor", "--device", device]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "device" in result.output and "Traceback" not in result.output


def test_doctor_offline_json(runner, tiny_registry):
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["cache"]["offline"] is True
    assert "torch" in report["versions"] and "cpu" in report["devices"]
    tiny = {row["key"]: row for row in report["weights"]}["tiny-clip"]
    assert tiny["present"] and tiny["verified"]


def test_doctor_table(runner):
    assert runner.invoke(app, ["doctor"]).exit_code == 0
