"""The CLI shell: commands, help, global options, exit codes."""
from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from zsadcli.cli import app
from zsadcli.commands.common import MethodOptions, method_options

COMMANDS = ("prepare", "train", "eval", "predict", "ablate", "calibrate", "weights", "doctor")


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


@pytest.mark.parametrize("command", ["predict", "eval", "ablate", "train", "calibrate"])
def test_method_options_come_from_one_declaration(command):
    """Every command that builds a method takes its method/weight options from commands.common,
    as one MethodOptions value; no command file declares them again."""
    import inspect
    from pathlib import Path

    import typer.main

    from zsadcli.commands import common

    click_command = typer.main.get_command(app).commands[command]
    names = {opt for param in click_command.params for opt in param.opts}
    assert {"--method", "--backbone", "--backbone-file", "--image-size", "--hparam", "--dino-file"} <= names
    if command != "train":
        assert {"--checkpoint", "--train-on", "--class-name", "--allow-pickle"} <= names
    source = Path(inspect.getfile(common)).with_name(f"{'eval' if command == 'eval' else command}.py").read_text()
    assert "typer.Option(\"--checkpoint\"" not in source and "CheckpointOpt" not in source


def test_method_options_reach_the_command_as_one_value():
    seen = {}

    @method_options(exclude={"ablate"})
    def command(ctx: typer.Context, method_options: MethodOptions, other: int = 1) -> None:
        seen["value"] = method_options

    probe = typer.Typer()
    probe.command()(command)
    result = CliRunner().invoke(probe, ["--method", "winclip", "--rep-vec", "pca", "--hparam", "sigma=2"])
    assert result.exit_code == 0, result.output
    chosen = seen["value"]
    assert chosen.method == "winclip" and chosen.hparams() == {"rep_vec": "pca", "sigma": 2}
    assert CliRunner().invoke(probe, ["--ablate", "x"]).exit_code == 2  # excluded options do not exist
