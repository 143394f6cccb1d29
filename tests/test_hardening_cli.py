"""Bad inputs tried as a new user would (issue 12, items 3-6 and parts of 10): option values checked
at parse time, resume that keeps to its settings, masks checked against images, one rule for empty
classes, outputs checked before any compute and results kept when the disk fills at the end."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_commands import checkpoint, runner  # noqa: F401 (shared module fixtures)
from zsadcli.cli import app
from zsadcli.data.meta import MetaItem, write_meta
from zsadcli.data.synthetic import generate_synthetic

TINY = ["--backbone", "tiny-clip", "--image-size", "56", "--device", "cpu"]  # 4 x 4 patches: cheap


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``small``: one class of 5 images; ``odd``: the same plus an empty class, one anomalous
    image without a mask and (``badmask``) one mask of the wrong size."""
    root = tmp_path_factory.mktemp("data")
    meta = generate_synthetic(root / "small", seed=4, classes=("disc",), size=64, n_train=0, n_test_good=2,
                              n_per_defect=1, defect_scale=2.5)
    write_meta(root / "small", meta)
    items = [MetaItem(str(root / "small" / it.img_path), str(root / "small" / it.mask_path) if it.mask_path else "",
                      it.cls_name, it.specie_name, it.anomaly) for it in meta["test"]["disc"]]
    anomalous = [i for i, it in enumerate(items) if it.anomaly]
    unmasked = list(items)
    unmasked[anomalous[0]] = MetaItem(items[anomalous[0]].img_path, "", "disc", "x", 1)
    write_meta(root / "odd", {"train": {}, "test": {"disc": unmasked, "empty": []}})
    small_mask = root / "small_mask.png"
    Image.open(items[anomalous[1]].mask_path).resize((32, 32)).save(small_mask)
    bad = list(items)
    bad[anomalous[1]] = MetaItem(items[anomalous[1]].img_path, str(small_mask), "disc", "x", 1)
    write_meta(root / "badmask", {"train": {}, "test": {"disc": bad}})
    return root


def no_traceback(result) -> bool:
    return "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)


# ------------------------------------------------------------------ item 3: option values
@pytest.mark.parametrize("args", [
    ["train", "--epochs", "0"], ["train", "--batch-size", "0"], ["train", "--lr", "nan"], ["train", "--lr", "-1"],
    ["train", "--lr", "inf"], ["train", "--image-size", "0"], ["train", "--image-size", "-5"],
    ["predict", "x.png", "--image-size", "100000"], ["predict", "x.png", "--threshold", "nan"],
    ["predict", "x.png", "--batch-size", "0"], ["eval", "--test-on", "x", "--batch-size", "-1"],
    ["ablate", "--test-on", "x", "--batch-size", "0"], ["train", "--seed", "-1"],
])
def test_nonsense_numbers_exit_2_with_the_range(runner, tmp_path, args):
    result = runner.invoke(app, [*args, "--runs", str(tmp_path / "runs")] if args[0] != "predict" else args)
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output and no_traceback(result)
    assert not (tmp_path / "runs").exists()


def test_image_size_must_fit_the_patch_before_weights_load(runner, tmp_path, checkpoint, data, monkeypatch,
                                                           tiny_registry):
    image = str(data / "small" / "disc/test/good/000.png")
    import zsadcli.core.engine as engine

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    with monkeypatch.context() as patched:  # the registry's safetensors header tells the patch size
        patched.setattr(engine, "_shared_backbone", no_loading)
        result = runner.invoke(app, ["predict", image, "--checkpoint", str(checkpoint), "--backbone", "tiny-clip",
                                     "--image-size", "13", "--device", "cpu"])
    assert result.exit_code == 2 and "patch size 14" in result.output and "--image-size 14" in result.output
    # a torch pickle has no header: checked right after its shapes are read, before any image
    pickled = tmp_path / "tiny.pt"
    torch.save(load_file(str(tiny_registry["payload"])), pickled)
    result = runner.invoke(app, ["predict", image, "--checkpoint", str(checkpoint), "--backbone-file", str(pickled),
                                 "--hparam", "image_size=120", "--device", "cpu"])
    assert result.exit_code == 2 and "multiple of its patch size 14" in result.output, result.output


@pytest.mark.parametrize("value, words", [("sigma=[1,2", "not a valid YAML value"), ("sigma=abc", "finite number"),
                                          ("layers=3", "a list"), ("fp16_deep_prompts=7", "true or false"),
                                          ("n_ctx=1.5", "an integer")])
def test_bad_hparam_values_exit_2_naming_the_key(runner, checkpoint, data, value, words):
    result = runner.invoke(app, ["predict", str(data / "small" / "disc/test/good/000.png"), "--checkpoint",
                                 str(checkpoint), *TINY, "--hparam", value])
    assert result.exit_code == 2 and words in result.output and value.split("=")[0] in result.output, result.output
    assert no_traceback(result)


# ------------------------------------------------------------------ item 4: resume keeps its settings
def test_resume_refuses_changed_settings_unless_allowed(runner, tmp_path, data):
    runs = tmp_path / "runs"
    common = ["train", "--on", "small", "--data-root", str(data), "--runs", str(runs), "--name", "r",
              "--batch-size", "8", "--device", "cpu", "--backbone", "tiny-clip"]
    first = runner.invoke(app, [*common, "--image-size", "56", "--epochs", "1"])
    assert first.exit_code == 0, first.output
    changed = runner.invoke(app, [*common, "--image-size", "28", "--lr", "0.01", "--epochs", "2", "--resume"])
    assert changed.exit_code == 2, changed.output
    assert "hparams.image_size: 56 -> 28" in changed.output and "lr: 0.001 -> 0.01" in changed.output
    allowed = runner.invoke(app, [*common, "--image-size", "56", "--lr", "0.01", "--epochs", "2", "--resume",
                                  "--allow-changes"])
    assert allowed.exit_code == 0, allowed.output
    config = json.loads((runs / "train" / "r" / "config.json").read_text())
    assert config["lr"] == 0.01 and config["resumed"][-1]["after_epoch"] == 1
    assert config["resumed"][-1]["changed"] == ["lr: 0.001 -> 0.01"]
    fewer = runner.invoke(app, [*common, "--image-size", "56", "--lr", "0.01", "--epochs", "1", "--resume"])
    assert fewer.exit_code == 2 and "already trained 2 epochs" in fewer.output


# ------------------------------------------------------------------ item 5: masks, empty classes
def test_mask_of_another_size_exits_2_naming_the_pair(runner, tmp_path, checkpoint, data):
    for args in (["eval", "--test-on", "badmask", "--checkpoint", str(checkpoint)],
                 ["train", "--on", "badmask", "--epochs", "1"]):
        result = runner.invoke(app, [*args, "--data-root", str(data), *TINY, "--runs", str(tmp_path / "runs")])
        assert result.exit_code == 2, result.output
        assert "small_mask.png is 32x32" in result.output and "is 64x64" in result.output
    assert not any(p.is_file() for p in (tmp_path / "runs").rglob("*"))


def test_empty_class_skipped_unmasked_flagged_names_deduplicated(runner, tmp_path, checkpoint, data):
    result = runner.invoke(app, ["eval", "--test-on", "odd, odd", "--classes", " disc,empty", "--checkpoint",
                                 str(checkpoint), "--data-root", str(data), *TINY, "--runs", str(tmp_path / "runs"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["datasets"]
    assert len(report) == 1 and list(report[0]["per_class"]) == ["disc"]  # evaluated once, " disc" stripped
    assert "odd more than once" in result.stderr
    notes = report[0]["notes"]
    assert "class empty has no items: skipped" in notes
    assert sum("anomalous image(s) have no mask_path" in n for n in notes) == 1
    check = runner.invoke(app, ["prepare", "--check", str(data / "odd"), "--json"])
    assert check.exit_code == 0, check.output
    checked = json.loads(check.stdout)["notes"]
    assert len(checked) == 2 and set(checked) <= set(notes)  # the same rule in prepare --check


# ------------------------------------------------------------------ item 6: outputs
def test_unwritable_outputs_exit_2_before_any_compute(runner, tmp_path, checkpoint, data, monkeypatch):
    import zsadcli.core.ablation as ablation
    import zsadcli.core.engine as engine

    def no_compute(*args, **kwargs):
        raise AssertionError("the method was built")

    # both names: ablation binds build_method at import, and must not keep the stand-in afterwards
    monkeypatch.setattr(engine, "build_method", no_compute)
    monkeypatch.setattr(ablation, "build_method", no_compute)
    image = str(data / "small" / "disc/test/good/000.png")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    (tmp_path / "dir.png").mkdir()
    if os.geteuid() == 0:  # root writes anywhere: report the folder as the OS would to a user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == locked else real_access(p, m))
    cases = [
        ["predict", image, "--checkpoint", str(checkpoint), *TINY, "--out", str(locked / "h.png")],
        ["predict", image, "--checkpoint", str(checkpoint), *TINY, "--out-dir", str(a_file)],
        ["predict", image, "--checkpoint", str(checkpoint), *TINY, "--save-raw", str(a_file / "raw")],
        ["predict", image, "--checkpoint", str(checkpoint), *TINY, "--out", str(tmp_path / "dir.png")],
        ["eval", "--test-on", "small", "--data-root", str(data), "--checkpoint", str(checkpoint), *TINY,
         "--runs", str(a_file)],
        ["train", "--on", "small", "--data-root", str(data), *TINY, "--runs", str(locked / "runs")],
        ["ablate", "--test-on", "small", "--data-root", str(data), "--checkpoint", str(checkpoint), *TINY,
         "--runs", str(a_file / "deeper")],
        ["prepare", "synthetic", str(locked / "syn")],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert ("not writable" in result.output or "is a file" in result.output or "is a folder" in result.output
                or "cannot be a folder" in result.output), result.output
    locked.chmod(0o755)
    assert list(locked.iterdir()) == [] and a_file.read_text() == "x"


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_at_the_end_keeps_eval_results_and_leaves_no_partial_files(runner, tmp_path, checkpoint, data,
                                                                              monkeypatch):
    import tempfile

    runs = tmp_path / "runs"
    real_write_text = Path.write_text

    def full_under_runs(self, *args, **kwargs):
        if str(self).startswith(str(runs)):
            enospc()
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_under_runs)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = runner.invoke(app, ["eval", "--test-on", "small", "--data-root", str(data), "--checkpoint",
                                 str(checkpoint), *TINY, "--runs", str(runs), "--name", "e"])
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.output and no_traceback(result)
    fallback = list((tmp_path / "tmp").glob("zsad-eval-e-*.json"))
    assert len(fallback) == 1 and str(fallback[0]) in result.output.replace("\n", "")
    saved = json.loads(fallback[0].read_text())
    assert saved["datasets"][0]["per_class"]["disc"]["image"]["auroc"] is not None
    assert not runs.exists() or not any(p.is_file() for p in runs.rglob("*"))  # nothing partial, no empty folders


def test_full_disk_in_predict_exits_2_without_partial_files(runner, tmp_path, checkpoint, data, monkeypatch):
    monkeypatch.setattr(np, "save", enospc)
    raw = tmp_path / "out" / "raw"
    result = runner.invoke(app, ["predict", str(data / "small" / "disc/test/good/000.png"), "--checkpoint",
                                 str(checkpoint), *TINY, "--save-raw", str(raw)])
    assert result.exit_code == 2 and "No space left on device" in result.output and str(raw) in result.output
    assert not (tmp_path / "out").exists()  # neither a .part file nor the folders made for it


# ------------------------------------------------------------------ item 10: messages
def test_colliding_output_names_name_both_inputs(runner, tmp_path, checkpoint, data):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.png").write_bytes((data / "small" / "disc/test/good/000.png").read_bytes())
    result = runner.invoke(app, ["predict", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                                 "--checkpoint", str(checkpoint), *TINY, "--out-dir", str(tmp_path / "o")])
    text = result.output.replace("\n", "")
    assert result.exit_code == 2 and str(tmp_path / "a" / "x.png") in text and str(tmp_path / "b" / "x.png") in text
