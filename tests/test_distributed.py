"""torchrun (2 CPU processes, gloo) against a plain process: sharded eval and predict give the same
files, DDP training writes from rank 0 and resumes, --workers changes nothing, an interrupted eval
resumes to the same metrics.json. Few launches (each process imports torch), tiny CLIP, 56 px."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from test_commands import checkpoint  # noqa: F401  (fixture)
from zsadcli.cli import app
from zsadcli.data.meta import write_meta
from zsadcli.data.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--image-size", "56", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two classes of 5 test images (odd: the ranks' shares differ) and 5 loose images to predict."""
    root = tmp_path_factory.mktemp("dist")
    write_meta(root / "synthetic", generate_synthetic(root / "synthetic", seed=3, size=56, classes=("disc", "checker"),
                                                      n_train=0, n_test_good=2, n_per_defect=1, defect_scale=2.0))
    loose = root / "loose"
    loose.mkdir()
    for i, image in enumerate(sorted((root / "synthetic" / "disc" / "test").rglob("*.png"))):
        (loose / f"{i:02d}.png").write_bytes(image.read_bytes())
    return root


@pytest.fixture(scope="module")
def model_args(tiny_registry, checkpoint) -> list[str]:  # noqa: F811
    return ["--method", "anomalyclip", "--backbone-file", str(tiny_registry["payload"]), *SIZE]


def torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m zsadcli ARGS`` (a free port each time)."""
    # COLUMNS: wide enough that the eval table prints as one part (rank 0's table is counted below)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "zsadcli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def single(args: list[str]):
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def single_eval(tmp_path_factory, data, model_args, checkpoint) -> str:  # noqa: F811
    """metrics.json of the plain, uninterrupted run every other eval must equal."""
    runs = tmp_path_factory.mktemp("runs")
    result = single(["eval", *model_args, "--checkpoint", str(checkpoint), "--test-on", "synthetic", "--data-root",
                     str(data), "--runs", str(runs), "--name", "single", "--workers", "0"])
    assert result.exit_code == 0, result.output
    return (runs / "eval" / "single" / "metrics.json").read_text()


def test_torchrun_eval_equals_single_process(tmp_path, data, model_args, checkpoint, single_eval):  # noqa: F811
    run = torchrun(["eval", *model_args, "--checkpoint", str(checkpoint), "--test-on", "synthetic",
                    "--data-root", str(data), "--name", "X"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "runs" / "eval" / "X"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.json", "per_class.csv"]
    assert (folder / "metrics.json").read_text() == single_eval
    assert run.stderr.count("wrote runs/eval/X/metrics.json") == 1  # rank 0 alone reports
    assert run.stderr.count("anomalyclip on synthetic") == 1


def test_torchrun_predict_equals_single_process(tmp_path, data, model_args, checkpoint):  # noqa: F811
    args = ["predict", str(data / "loose"), *model_args, "--checkpoint", str(checkpoint), "--json",
            "--batch-size", "2"]
    plain = single([*args, "--save-raw", str(tmp_path / "plain"), "--workers", "0"])
    assert plain.exit_code == 0, plain.output
    sharded = torchrun([*args, "--save-raw", str(tmp_path / "sharded"), "--out-dir", str(tmp_path / "png")],
                       cwd=tmp_path)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    expected = [json.loads(line) for line in plain.stdout.splitlines()]
    got = [json.loads(line) for line in sharded.stdout.splitlines()]  # rank 0 alone prints, in input order
    assert len(expected) == 5 and [r.pop("heatmap") for r in got] == [str(tmp_path / "png" / f"{i:02d}.png")
                                                                       for i in range(5)]
    assert got == [{**r, "raw": r["raw"].replace("plain", "sharded")} for r in expected]
    for i in range(5):
        np.testing.assert_array_equal(np.load(tmp_path / "plain" / f"{i:02d}.npy"),
                                      np.load(tmp_path / "sharded" / f"{i:02d}.npy"))
    assert all((tmp_path / "png" / f"{i:02d}.png").is_file() for i in range(5))  # both ranks wrote theirs


def test_ddp_train_writes_from_rank_0_and_resumes(tmp_path, data, model_args):
    from safetensors.torch import load_file

    args = ["train", *model_args, "--on", "synthetic", "--data-root", str(data), "--batch-size", "4"]
    first = torchrun([*args, "--epochs", "1", "--name", "cut"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "train" / "cut"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "epoch_1.safetensors", "history.json",
                                                     "train_state.pt"]
    assert first.stderr.count("epoch 1/1:") == 1
    resumed = torchrun([*args, "--epochs", "2", "--name", "cut", "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 1 of 2" in resumed.stderr
    straight = torchrun([*args, "--epochs", "2", "--name", "straight"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = load_file(run / "epoch_2.safetensors"), load_file(tmp_path / "runs/train/straight/epoch_2.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(json.loads((run / "history.json").read_text())) == 2


def test_ddp_refuses_a_batch_the_ranks_cannot_share(tmp_path, data, model_args, monkeypatch):
    # refused before any process group starts, so rank 0 of a pretended 2-process job shows it
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = single(["train", *model_args, "--on", "synthetic", "--data-root", str(data), "--batch-size", "3",
                     "--runs", str(tmp_path)])
    assert result.exit_code == 2 and "cannot be split evenly over 2 processes" in result.output
    assert not any(tmp_path.iterdir())


def test_workers_do_not_change_results(tmp_path, data, model_args, checkpoint, single_eval):  # noqa: F811
    result = single(["eval", *model_args, "--checkpoint", str(checkpoint), "--test-on", "synthetic", "--data-root",
                     str(data), "--runs", str(tmp_path), "--name", "w2", "--workers", "2", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "w2" / "metrics.json").read_text() == single_eval


def test_interrupted_eval_resumes_to_the_same_metrics(tmp_path, data, model_args, checkpoint, single_eval,  # noqa: F811
                                                     monkeypatch):
    from zsadcli.core import resumable

    save = resumable.ClassResults.save

    def save_then_sigterm(self, *args, **kwargs):  # the job is killed right after its first class
        save(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    args = ["eval", *model_args, "--checkpoint", str(checkpoint), "--test-on", "synthetic", "--data-root", str(data),
            "--runs", str(tmp_path), "--name", "cut", "--workers", "0"]
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(resumable.ClassResults, "save", save_then_sigterm)
    stopped = single(args)
    monkeypatch.undo()
    assert stopped.exit_code == 130, stopped.output
    assert "--name cut" in stopped.output and "--resume" in stopped.output
    folder = tmp_path / "eval" / "cut"
    assert not (folder / "metrics.json").exists() and not (folder / "per_class.csv").exists()
    assert [p.name for p in (folder / "partial" / "synthetic").iterdir()] == ["disc.json"]
    assert signal.getsignal(signal.SIGTERM) is handler  # given back

    changed = single([*args, "--resume", "--aupro", "compat200"])
    assert changed.exit_code == 2 and "aupro" in changed.output
    resumed = single([*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert (folder / "metrics.json").read_text() == single_eval
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.json", "per_class.csv"]
    again = single([*args, "--resume"])
    assert again.exit_code == 2 and "complete" in again.output
