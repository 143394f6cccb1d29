"""`zsad export` and `--model DIR`: every method exported to ONNX and OpenVINO IR reproduces its
torch fp32 output (max |Δ map| <= 1e-4, max |Δ score| <= 1e-5) at two batch sizes; the CLI
interface (export, predict --save-raw --json, eval) on anomalyclip; the model card; refusals.

Exports are the slow part (a torch.export capture plus the ONNX translation per method), so the
backbones here are shallow variants of the tiny test CLIPs (3 to 6 vision blocks; the methods
map their layer numbers onto the depth) and each method is exported once per module.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tinyclip import build_seeded_clip
from tinydino import tiny_dinov2_state_dict
from zsadcli.cli import app
from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.core.runtime import MODEL_CARD, load_exported
from zsadcli.data.images import open_image
from zsadcli.data.meta import load_meta

MAP_TOL, SCORE_TOL = 1e-4, 1e-5
FORMATS = ("onnx", "openvino")
SIZES = {"anomalyclip": 56, "crane": 56, "crane+": 56, "bsrclip": 140, "vip2clip": 112, "winclip": 64,
         "clip-ad": 64, "clip-ad+": 64, "aprilgan": 56}
pytestmark = pytest.mark.filterwarnings("ignore")


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_registry) -> dict[str, Path]:
    """Shallow tiny backbones (patch-14 CLIP, 768-wide-text CLIP, ViT-B-16-plus-shaped GELU CLIP)
    and a checkpoint per trained method, in the authors' layouts the method tests use."""
    import test_adaclip
    import test_anomalyclip
    import test_aprilgan
    import test_bsrclip
    import test_clip_ad
    import test_crane
    import test_vip2clip

    root = tmp_path_factory.mktemp("export-weights")

    def clip14(depth: int):
        return build_seeded_clip(0, embed_dim=32, vision_layers=depth, vision_width=128, patch_size=14,
                                 image_size=224, text_width=64, text_layers=12, quick_gelu=True)

    clip768 = build_seeded_clip(0, embed_dim=768, vision_layers=3, vision_width=64, patch_size=14, image_size=224,
                                text_width=768, text_layers=2, quick_gelu=True)
    b16 = build_seeded_clip(0, embed_dim=32, vision_layers=4, vision_width=128, patch_size=16, image_size=240,
                            text_width=64, text_layers=4, quick_gelu=False)
    files = {"clip": root / "clip3.safetensors", "clip6": root / "clip6.safetensors",
             "clip768": root / "clip768.safetensors", "b16": root / "b16plus4.safetensors",
             "anomalyclip": root / "anomalyclip.pth", "crane": root / "crane.pth", "dino": root / "dino.pth",
             "bsrclip": root / "bsr.pt", "vip2clip": root / "vip.pth", "clip-ad+": root / "heads.pth",
             "aprilgan": root / "aprilgan.pth", "adaclip": root / "adaclip.pth"}
    save_file(_state(clip14(3)), str(files["clip"]))
    clip6 = _state(clip14(6))
    save_file(clip6, str(files["clip6"]))  # BSR-CLIP reads block 6 literally
    save_file(_state(clip768), str(files["clip768"]))
    save_file(_state(b16), str(files["b16"]))
    torch.save(test_anomalyclip.authors_checkpoint(), files["anomalyclip"])
    torch.save(test_crane.crane_checkpoint(), files["crane"])
    torch.save(tiny_dinov2_state_dict(seed=0, grid=16), files["dino"])
    torch.save(test_bsrclip.plain_checkpoint(), files["bsrclip"])
    torch.save(test_vip2clip.authors_checkpoint(_state(clip768)), files["vip2clip"])
    torch.save(test_clip_ad.authors_heads(), files["clip-ad+"])
    torch.save(test_aprilgan.authors_heads(width=128, embed=32), files["aprilgan"])
    torch.save(test_adaclip.authors_checkpoint(clip6), files["adaclip"])
    return files


def method_args(name: str, files: dict[str, Path]) -> list[str]:
    """The CLI's method/weight options for ``name`` on the shallow tiny models."""
    backbone = {"vip2clip": "clip768", "bsrclip": "clip6", "winclip": "b16", "clip-ad": "b16",
                "clip-ad+": "b16", "aprilgan": "clip6", "adaclip": "clip6"}.get(name, "clip")
    args = ["--method", name, "--backbone-file", str(files[backbone]), "--image-size", str(SIZES.get(name, 56))]
    checkpoint = "crane" if name == "crane+" else name
    if checkpoint in files:
        args += ["--checkpoint", str(files[checkpoint])]
    if name == "crane+":
        args += ["--dino-file", str(files["dino"])]
    if name == "vip2clip":
        args += ["--hparam", "topk=20"]  # an 8 x 8 patch grid
    if name in ("winclip", "clip-ad", "clip-ad+", "aprilgan", "adaclip"):
        args += ["--class-name", "bottle"]
    return args


def torch_method(name: str, files: dict[str, Path]):
    """The same configuration built directly (torch fp32, CPU)."""
    args = method_args(name, files)
    opts = dict(zip(args[::2], args[1::2]))
    hparams = {"dino_file": opts["--dino-file"]} if "--dino-file" in opts else {}
    if "--hparam" in opts:
        key, value = opts["--hparam"].split("=")
        hparams[key] = int(value)
    spec = MethodSpec(name, backbone_file=opts["--backbone-file"], checkpoint=opts.get("--checkpoint"),
                      image_size=int(opts["--image-size"]), hparams=hparams, class_name=opts.get("--class-name"),
                      ablate=frozenset([opts["--ablate"]]) if "--ablate" in opts else frozenset())
    return build_method(spec).method


_EXPORTED: dict[str, dict[str, Path]] = {}


@pytest.fixture(scope="module")
def exported(weights, tmp_path_factory):
    """name -> {format: model folder}, each method exported once (both formats from one capture;
    anomalyclip through the CLI, as a user does)."""
    from zsadcli.core.export import export_method

    root = tmp_path_factory.mktemp("exported")
    _EXPORTED.clear()

    def get(name: str) -> dict[str, Path]:
        if name not in _EXPORTED:
            targets = {fmt: root / f"{name}-{fmt}" for fmt in FORMATS}
            if name == "anomalyclip":
                for fmt, out in targets.items():
                    result = CliRunner().invoke(app, ["export", *method_args(name, weights), "--format", fmt,
                                                      "--precision", "fp32", "--out", str(out), "--quiet"])
                    assert result.exit_code == 0, result.output
            else:
                method = torch_method(name, weights)
                args = method_args(name, weights)
                opts = dict(zip(args[::2], args[1::2]))
                description = {"checkpoint": opts.get("--checkpoint"), "hparams": method.hparams}
                spec = MethodSpec(name, backbone_file=opts["--backbone-file"])
                export_method(method, description, spec, targets, precision="fp32")
            _EXPORTED[name] = targets
        return _EXPORTED[name]

    return get


@pytest.fixture(scope="module")
def sample_images(synthetic_root) -> list[Path]:
    meta = load_meta(synthetic_root)["test"]
    return [synthetic_root / meta[cls][i].img_path for cls, i in (("disc", 0), ("checker", -1), ("stripes", 3))]


# ---------------------------------------------------------------------- faithfulness
@pytest.mark.parametrize("name", list(SIZES))
def test_every_method_exports_and_matches_torch_fp32(name, weights, exported, sample_images):
    method = torch_method(name, weights)
    batch = torch.stack([method.preprocess(open_image(p)) for p in sample_images])
    with torch.no_grad():
        ref = method(batch)
    for fmt, folder in exported(name).items():
        runner = load_exported(folder, "fp32")
        assert runner.precision == "fp32"
        for images, score, maps in ((batch, ref.image_score, ref.anomaly_map),  # batch 3 (captured with 2)
                                    (batch[1:2], ref.image_score[1:2], ref.anomaly_map[1:2])):  # and batch 1
            out = runner.run(images)
            assert out.anomaly_map.shape == maps.shape and out.anomaly_map.dtype == torch.float32
            assert float((out.anomaly_map - maps).abs().max()) <= MAP_TOL, (name, fmt)
            assert float((out.image_score - score).abs().max()) <= SCORE_TOL, (name, fmt)
        assert maps.std() > 0  # the comparison is not between constant maps


def test_model_card_records_what_the_model_was_made_from(weights, exported):
    from zsadcli.core.runtime import sha256_file

    for fmt, folder in exported("crane+").items():
        card = json.loads((folder / MODEL_CARD).read_text())
        assert card["schema"] == "zsad-model" and card["version"] == 1 and card["format"] == fmt
        assert card["method"] == "crane+" and card["image_size"] == 56 and card["precision"] == "fp32"
        assert card["hparams"]["dino_file"] == str(weights["dino"])
        assert card["sources"]["dino_file"]["sha256"] == sha256_file(weights["dino"])
        assert card["sources"]["backbone"]["sha256"] == sha256_file(weights["clip"])
        for name, digest in card["files"].items():
            assert sha256_file(folder / name) == digest
        assert card["normalisation"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
        assert "torch" in card["exporter"] and card["faithfulness_fp32"]["max_abs_anomaly_map"] <= MAP_TOL
    winclip = json.loads((exported("winclip")["onnx"] / MODEL_CARD).read_text())
    assert winclip["class_name"] == "bottle"
    assert winclip["normalisation"]["preprocess"].endswith("WinCLIP.preprocess_image")


# ---------------------------------------------------------------------- the CLI interface
@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_with_model_writes_what_torch_predict_writes(fmt, weights, exported, sample_images, tmp_path):
    folder = exported("anomalyclip")[fmt]
    inputs = [str(p) for p in sample_images[:2]]
    runner = CliRunner()
    result = runner.invoke(app, ["predict", *inputs, "--model", str(folder), "--precision", "fp32",
                                 "--save-raw", str(tmp_path / "raw"), "--json", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["path"] for r in records] == inputs
    reference = runner.invoke(app, ["predict", *inputs, *method_args("anomalyclip", weights), "--device", "cpu",
                                    "--save-raw", str(tmp_path / "torch"), "--json"])
    assert reference.exit_code == 0, reference.output
    expected = [json.loads(line) for line in reference.stdout.splitlines() if line.startswith("{")]
    for record, ref, path in zip(records, expected, sample_images):
        raw = np.load(tmp_path / "raw" / f"{path.stem}.npy")
        assert raw.dtype == np.float32 and raw.shape == (56, 56)
        assert np.abs(raw - np.load(tmp_path / "torch" / f"{path.stem}.npy")).max() <= MAP_TOL
        assert abs(record["image_score"] - ref["image_score"]) <= SCORE_TOL


def test_eval_with_model_matches_torch_eval(weights, exported, synthetic_root, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "syn").symlink_to(synthetic_root)
    common = ["--test-on", "syn", "--data-root", str(data), "--runs", str(tmp_path / "runs"), "--json",
              "--classes", "disc,stripes"]
    runner = CliRunner()
    got = runner.invoke(app, ["eval", *common, "--model", str(exported("anomalyclip")["onnx"]), "--name", "onnx"])
    assert got.exit_code == 0, got.output
    ref = runner.invoke(app, ["eval", *common, *method_args("anomalyclip", weights), "--device", "cpu",
                              "--name", "torch"])
    assert ref.exit_code == 0, ref.output
    got_mean = json.loads(got.stdout)["datasets"][0]["mean"]
    ref_mean = json.loads(ref.stdout)["datasets"][0]["mean"]
    for level in ("image", "pixel"):
        assert got_mean[level]["auroc"]["mean"] == pytest.approx(ref_mean[level]["auroc"]["mean"], abs=1e-3)
    config = json.loads((tmp_path / "runs" / "eval" / "onnx" / "config.json").read_text())
    assert config["models"]["syn"]["runtime"] == "onnxruntime"


def test_class_aware_model_notes_its_baked_class_name_in_eval(exported, synthetic_root, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "syn").symlink_to(synthetic_root)
    result = CliRunner().invoke(app, ["eval", "--test-on", "syn", "--data-root", str(data), "--runs",
                                      str(tmp_path / "runs"), "--json", "--classes", "disc",
                                      "--model", str(exported("winclip")["openvino"]), "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["datasets"][0]["notes"]
    assert any("'bottle' baked into its prompts" in n for n in notes)


# ---------------------------------------------------------------------- refusals
def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_a_folder_that_is_not_a_model_is_exit_2(exported, tmp_path, sample_images):
    image = str(sample_images[0])
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _invoke("predict", image, "--model", str(empty))
    assert result.exit_code == 2 and MODEL_CARD in result.output

    source = exported("anomalyclip")["onnx"]
    missing = tmp_path / "missing"
    shutil.copytree(source, missing)
    (missing / "model.onnx").unlink()
    result = _invoke("predict", image, "--model", str(missing))
    assert result.exit_code == 2 and "model.onnx" in result.output and "missing" in result.output

    newer = tmp_path / "newer"
    shutil.copytree(source, newer)
    card = json.loads((newer / MODEL_CARD).read_text())
    card.update(version=99, zsad_version="9.0")
    (newer / MODEL_CARD).write_text(json.dumps(card))
    result = _invoke("predict", image, "--model", str(newer))
    assert result.exit_code == 2 and "version 99" in result.output


def test_a_changed_model_file_is_exit_4(exported, tmp_path, sample_images):
    changed = tmp_path / "changed"
    shutil.copytree(exported("anomalyclip")["openvino"], changed)
    with open(changed / "model.bin", "ab") as fh:
        fh.write(b"\0")
    result = _invoke("predict", str(sample_images[0]), "--model", str(changed), "--save-raw", str(tmp_path / "raw"))
    assert result.exit_code == 4 and "sha256" in result.output
    assert not (tmp_path / "raw").exists()


def test_model_with_weight_options_is_exit_2_and_ablate_refuses_it(exported, weights, sample_images):
    folder = str(exported("anomalyclip")["onnx"])
    for extra in (["--checkpoint", str(weights["anomalyclip"])], ["--method", "anomalyclip"],
                  ["--image-size", "112"], ["--hparam", "sigma=2"]):
        result = _invoke("predict", str(sample_images[0]), "--model", folder, *extra)
        assert result.exit_code == 2 and extra[0] in result.output, extra
    result = _invoke("ablate", "--model", folder, "--test-on", "syn")
    assert result.exit_code == 2 and "does not take --model" in result.output
    result = _invoke("predict", str(sample_images[0]), "--model", folder, "--precision", "bf16")
    assert result.exit_code == 2 and "fp32" in result.output  # ONNX Runtime runs fp32 only


def test_export_refusals(weights, exported, tmp_path):
    anomalyclip = method_args("anomalyclip", weights)
    existing = exported("anomalyclip")["onnx"]
    before = (existing / MODEL_CARD).read_text()
    result = _invoke("export", *anomalyclip, "--format", "onnx", "--out", str(existing))
    assert result.exit_code == 2 and "--force" in result.output
    assert (existing / MODEL_CARD).read_text() == before
    result = _invoke("export", *anomalyclip, "--format", "onnx", "--precision", "bf16", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "bf16" in result.output
    result = _invoke("export", *anomalyclip, "--format", "tensorrt", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    result = _invoke("export", *method_args("clip-ad", weights), "--hparam", "transductive=true",
                     "--format", "onnx", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "transductive" in result.output
    result = _invoke("export", *method_args("adaclip", weights), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "KMeans" in result.output and "re-encoded per image" in result.output
    assert not (tmp_path / "x").exists()


def test_missing_runtime_is_exit_2_with_the_pip_command(exported, sample_images, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    result = _invoke("predict", str(sample_images[0]), "--model", str(exported("anomalyclip")["openvino"]))
    assert result.exit_code == 2 and "pip install 'zsad[openvino]'" in result.output


# ---------------------------------------------------------------------- decisions on an exported model
def test_calibrate_and_predict_with_a_model_use_one_card(weights, exported, synthetic_root, tmp_path):
    """`zsad calibrate --model DIR` writes a card tied to the weights the model was made from; predict
    with the model applies it (label = score >= threshold), and a card made with the torch method from
    the same weights fits the model too; a card for other weights is refused."""
    folder = str(exported("anomalyclip")["onnx"])
    normal = sorted((synthetic_root / "disc" / "test" / "good").glob("*.png"))[:6]
    good = tmp_path / "good"
    good.mkdir()
    for path in normal:
        (good / path.name).symlink_to(path)
    runner = CliRunner()
    made = runner.invoke(app, ["calibrate", "--model", folder, "--normal", str(good), "--target-fpr", "0.2",
                               "--out", str(tmp_path / "card.json"), "--json"])
    assert made.exit_code == 0, made.output
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["weights"]["model"] == folder and card["weights"]["checkpoint_sha256"]
    torch_card = runner.invoke(app, ["calibrate", *method_args("anomalyclip", weights), "--device", "cpu",
                                     "--normal", str(good), "--target-fpr", "0.2",
                                     "--out", str(tmp_path / "torch-card.json")])
    assert torch_card.exit_code == 0, torch_card.output
    images = [str(p) for p in sorted((synthetic_root / "stripes" / "test").rglob("*.png"))[:4]]
    for which in ("card.json", "torch-card.json"):
        result = runner.invoke(app, ["predict", *images, "--model", folder, "--calibration", str(tmp_path / which),
                                     "--json"])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert len(records) == len(images)
        for record in records:
            assert record["label"] == ("anomalous" if record["image_score"] >= record["threshold"] else "normal")
    other = json.loads((tmp_path / "card.json").read_text())
    other["weights"]["checkpoint_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused = runner.invoke(app, ["predict", images[0], "--model", folder, "--calibration", str(tmp_path / "other.json")])
    assert refused.exit_code == 2 and "checkpoint (sha256)" in refused.output
