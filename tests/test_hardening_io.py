"""Issue 12 (hardening), the input/output half: the allowlist unpickler, image decoding by real
range, huge images, rich markup in paths, file modes, messages, overlays, the default ViT-L
source and 80-column tables. Each test reproduces a reported failure as a user would meet it."""
from __future__ import annotations

import collections
import json
import os
import subprocess
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
        if label == "os.system":  # a bare pickle: torch's legacy-format path reads it with pickle.load
            import pickle

            evil.write_bytes(pickle.dumps(payload, protocol=2))
        else:
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


# ------------------------------------------------------------------ 2. bit depth and EXIF, images and masks
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_registry) -> Path:
    from test_anomalyclip import authors_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "epoch_15.pth"
    torch.save(authors_checkpoint(), path)
    return path


def _picture(size: int = 64) -> np.ndarray:
    """A grey picture with structure (a gradient and a dark square), uint8."""
    y, x = np.mgrid[0:size, 0:size]
    picture = (40 + 150 * x / size + 30 * np.sin(y / 5)).round().astype(np.uint8)
    picture[20:36, 30:46] = 10
    return picture


def _with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_sixteen_bit_float_and_rotated_images_score_as_their_8_bit_original(runner, tmp_path, checkpoint):
    from zsadcli.data.images import open_image

    picture = _picture()
    files = {"eight": tmp_path / "eight.png", "sixteen": tmp_path / "sixteen.png", "float": tmp_path / "float.tif",
             "rotated": tmp_path / "rotated.png"}
    Image.fromarray(picture).save(files["eight"])
    Image.fromarray(picture.astype(np.uint16) * 257).save(files["sixteen"])  # the same picture, 16 bit
    Image.fromarray(picture.astype(np.float32) / 255).save(files["float"])  # float in [0, 1]
    # stored rotated by 90 degrees with the EXIF tag that says "rotate back" (orientation 6)
    stored = Image.fromarray(picture).transpose(Image.Transpose.ROTATE_90)
    stored.save(files["rotated"], exif=_with_orientation(stored, 6))
    for name, path in files.items():
        assert np.array_equal(np.asarray(open_image(path).convert("L")), picture), name
    assert Image.open(files["sixteen"]).mode == "I;16" and Image.open(files["float"]).mode == "F"
    result = runner.invoke(app, ["predict", *map(str, files.values()), "--checkpoint", str(checkpoint), *TINY,
                                 "--json"])
    assert result.exit_code == 0, result.output
    scores = {Path(r["path"]).stem: r["image_score"] for r in map(json.loads, result.stdout.splitlines())}
    assert len(set(scores.values())) == 1, scores  # bit depth and orientation change nothing


def test_other_ranges_follow_the_documented_rule(tmp_path):
    from zsadcli.data.images import open_image

    dark16 = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)  # a 12-bit sensor in 16 bit
    Image.fromarray(dark16).save(tmp_path / "twelve.png")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "twelve.png")),
                                  np.round(dark16 / 257).astype(np.uint8))
    wide = np.linspace(-3.0, 5.0, 64 * 64, dtype=np.float32).reshape(64, 64)  # float outside [0, 1]: min-max
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    got = np.asarray(open_image(tmp_path / "wide.tif"))
    np.testing.assert_array_equal(got, np.round((wide.astype(np.float64) + 3) / 8 * 255).astype(np.uint8))


def test_masks_keep_small_labels_at_any_depth_and_follow_exif(tmp_path):
    from zsadcli.data.dataset import MetaDataset
    from zsadcli.data.images import clip_preprocess, load_mask, open_mask
    from zsadcli.data.meta import MetaItem

    labels = np.zeros((64, 64), np.uint16)
    labels[8:24, 40:56] = 1  # a label image with value 1 (VisA-style), 16 bit
    Image.fromarray(labels).save(tmp_path / "mask16.png")
    Image.fromarray(labels.astype(np.float32) * 0.5).save(tmp_path / "maskf.tif")
    binary = labels.astype(bool)
    for name in ("mask16.png", "maskf.tif"):
        assert np.array_equal(np.asarray(open_mask(tmp_path / name)) > 0, binary), name
    stored = Image.fromarray(binary.astype(np.uint8) * 255).transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "rot_mask.png", exif=_with_orientation(stored, 6))
    assert np.array_equal(load_mask(tmp_path / "rot_mask.png", 64).numpy(), load_mask(tmp_path / "mask16.png", 64).numpy())
    # eval and train read items through the same opener
    picture = _picture()
    Image.fromarray(picture.astype(np.uint16) * 257).save(tmp_path / "img16.png")
    Image.fromarray(picture).save(tmp_path / "img8.png")
    items = [MetaItem(img_path=f"img{d}.png", mask_path="mask16.png", cls_name="x", specie_name="bad", anomaly=1)
             for d in (16, 8)]
    data = MetaDataset(tmp_path, items, lambda im: clip_preprocess(im, 56), 56)
    assert torch.equal(data[0]["image"], data[1]["image"]) and data[0]["mask"].any()


# ------------------------------------------------------------------ 7. huge images: one limit, one message
def _png_header_bomb(path: Path, side: int) -> None:
    """A valid all-black side x side grey PNG of a few hundred KB (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    squeeze = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    data = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_huge_images_are_refused_with_one_message_and_the_limit_can_be_raised(runner, tmp_path, checkpoint,
                                                                                 monkeypatch):
    huge = tmp_path / "huge.png"
    _png_header_bomb(huge, 15000)
    result = runner.invoke(app, ["predict", str(huge), "--checkpoint", str(checkpoint), *TINY,
                                 "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "15000 x 15000" in result.output and "--max-image-pixels" in result.output
    assert not (tmp_path / "o.png").exists()
    small = tmp_path / "small.png"
    Image.fromarray(_picture()).save(small)  # 4096 pixels
    monkeypatch.setenv("ZSAD_MAX_IMAGE_PIXELS", "4000")
    refused = runner.invoke(app, ["predict", str(small), "--checkpoint", str(checkpoint), *TINY, "--json"])
    assert refused.exit_code == 2 and "4,000" in refused.output
    from zsadcli.data.validate import _probe

    assert "above zsad's limit" in _probe(small, decode=False)[1]  # prepare --check: the same limit
    try:
        raised = runner.invoke(app, ["--max-image-pixels", "5000", "predict", str(small), "--checkpoint",
                                     str(checkpoint), *TINY, "--json"])
        assert raised.exit_code == 0, raised.output
    finally:
        from zsadcli.data.images import set_max_image_pixels

        set_max_image_pixels(None)  # the option is process-wide, as in one CLI run


# ------------------------------------------------------------------ 8. paths are text, never rich markup
@pytest.fixture
def columns80(monkeypatch):
    """A non-TTY stderr 80 columns wide (CliRunner's stderr is not a terminal)."""
    from zsadcli.console import err_console

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(err_console, "_width", 80)


def test_bracketed_paths_print_as_they_are(tmp_path, checkpoint, columns80):
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    first, second = tmp_path / "x[" / "x[/b]y" / "g.png", tmp_path / "br[ack]ets" / "h.png"
    for path, seed in ((first, 0), (second, 1)):
        path.parent.mkdir(parents=True)
        Image.fromarray(np.roll(_picture(), seed * 7, axis=1)).save(path)
    result = runner.invoke(app, ["predict", str(first), str(second), "--checkpoint", str(checkpoint), *TINY,
                                 "--out-dir", str(tmp_path / "o[red]")])
    assert result.exit_code == 0, result.output
    assert f"{first}: score" in result.stderr and f"{second}: score" in result.stderr
    assert str(tmp_path / "o[red]" / "g.png") in result.stderr
    assert not result.stderr.startswith("\n")  # no progress-bar residue on a non-TTY stderr


def _bracket_dataset(root: Path) -> None:
    """One class named ``br[ack]ets`` (2 normal, 2 anomalous with masks), 48 px."""
    from zsadcli.data.meta import MetaItem, write_meta

    items = []
    for index, anomalous in enumerate((0, 0, 1, 1)):
        picture = np.roll(_picture(48), 5 * index, axis=0)
        image = f"br[ack]ets/test/{index}.png"
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(root / image)
        mask = ""
        if anomalous:
            mask = f"br[ack]ets/gt/{index}.png"
            (root / mask).parent.mkdir(parents=True, exist_ok=True)
            grid = np.zeros((48, 48), np.uint8)
            grid[10:20, 10 + index:30] = 255
            Image.fromarray(grid).save(root / mask)
        items.append(MetaItem(image, mask, "br[ack]ets", "bad" if anomalous else "good", anomalous))
    write_meta(root, {"train": {}, "test": {"br[ack]ets": items}})


def test_eval_table_keeps_bracketed_names_and_fits_80_columns(tmp_path, checkpoint, columns80):
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    _bracket_dataset(tmp_path / "data" / "d[x]")
    result = runner.invoke(app, ["eval", "--test-on", "d[x]", "--data-root", str(tmp_path / "data"),
                                 "--checkpoint", str(checkpoint), *TINY, "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    table_lines = [line for line in lines if not line.startswith(("wrote ", "mean over", "note:"))]
    assert all(len(line) <= 80 for line in table_lines), max(table_lines, key=len)  # logs are not wrapped
    assert "…" not in result.stderr  # folded or split, never cut
    assert any("br[ack]ets" in line for line in lines) and "d[x] (x100)" in result.stderr
    for header in ("img auroc", "img ap", "img f1-max", "px auroc", "px ap", "px f1-max", "px aupro"):
        assert header in result.stderr  # every column, whole, in one table or several
    assert not result.stderr.startswith("\n")


# ------------------------------------------------------------------ 13. tables at 80 columns
def test_tables_fold_or_split_never_cut(columns80, capsys):
    from rich.table import Table

    from zsadcli.console import err_console, print_table

    table = Table(title="anomalyclip ablation on visa (class means x100; change vs full)")
    table.add_column("variant")
    names = ["img auroc", "img ap", "img f1-max", "px auroc", "px ap", "px f1-max", "px aupro"]
    for name in names:
        table.add_column(name, justify="right")
    table.add_row("full", *["91.2"] * 7)
    table.add_row("- no-text-deep-prompts-and-more", *["88.0 [red](-3.2)[/]"] * 7)
    print_table(table)
    err = capsys.readouterr().err
    assert err_console.width == 80 and all(len(line) <= 80 for line in err.splitlines())
    parts = err.count("change vs full)")
    assert parts >= 2 and f"({parts}/{parts})" in err
    assert "…" not in err and err.count("no-text-deep-prompts-and-more") == parts  # repeated in each part
    assert all(name in err for name in names)


def test_weights_list_at_80_columns(tmp_path, columns80, monkeypatch):
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    monkeypatch.delenv("ZSAD_REGISTRY")  # the packaged registry: long sources
    result = runner.invoke(app, ["weights", "list"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("cache: ")]  # a log line
    assert all(len(line) <= 80 for line in lines) and "…" not in result.stderr
    from zsadcli.core import hub

    flat = "".join(line.split("│")[1].strip() for line in lines if line.startswith("│"))  # first cells
    for entry in hub.load_registry().values():
        assert entry.key in result.stderr
        assert entry.display_source in flat  # folded over lines, but whole
    # no column squeezed to a few letters per line
    assert sum(1 for line in lines if len(line.strip("│ ┃")) <= 3) < 5


# ------------------------------------------------------------------ 10. messages that name the real thing
def test_weights_verify_names_the_command_and_prepare_seed_help(tmp_path, monkeypatch):
    import yaml

    from zsadcli.core import hub

    registry = tmp_path / "reg.yaml"
    registry.write_text(yaml.safe_dump({"checkpoints": {"my-weights": {
        "source": "url", "url": "https://example.invalid/w.pth", "sha256": "0" * 64, "format": "authors"}}}))
    monkeypatch.setenv("ZSAD_REGISTRY", str(registry))
    monkeypatch.setenv("ZSAD_CACHE", str(tmp_path / "cache"))
    cached = hub._url_cache_path(hub.get_entry("my-weights"))
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"damaged")
    result = CliRunner().invoke(app, ["weights", "verify", "my-weights"])
    assert result.exit_code == 4
    assert "zsad weights download my-weights" in result.output and "NAME" not in result.output
    assert str(cached) in result.output.replace("\n", "")
    help_text = CliRunner().invoke(app, ["prepare", "--help"], env={"COLUMNS": "200"}).output
    assert "recipe" not in help_text and "synthetic" in help_text


def test_missing_mask_hint_names_mask_path(tmp_path):
    from zsadcli.data.images import load_mask
    from zsadcli.errors import BadInput

    with pytest.raises(BadInput) as raised:
        load_mask(tmp_path / "gone_mask.png", 32)
    assert "mask_path" in raised.value.hint and "img_path" not in raised.value.hint


# ------------------------------------------------------------------ 11. overlays scale with the image
def _ink_rows(canvas: Image.Image, box: tuple[int, int, int, int]) -> int:
    """How many pixel rows of ``box`` hold dark (text) pixels."""
    region = np.asarray(canvas.crop(box).convert("L"))
    return int((region < 100).any(axis=1).sum())


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (112, 112), (6000, 40)])
def test_overlay_keeps_the_image_and_scales_its_text(size):
    from zsadcli.core.heatmap import jet, overlay_layout, render_overlay

    width, height = size
    image = Image.new("RGB", size, (40, 80, 120))
    amap = np.zeros((height, width), np.float32)
    short = render_overlay(image, amap, score=0.5)
    long = render_overlay(image, amap, score=0.5, threshold=0.123456789, normalize="image")
    layout = overlay_layout(width, height)
    assert short.size == long.size == layout.canvas  # the caption never changes the size
    # the image keeps its own pixels and size: a zero map on the fixed scale is pure blue, blended
    expected = np.round(0.5 * np.array([40, 80, 120]) + 0.5 * jet(np.zeros(1))[0]).astype(np.uint8)
    assert (np.asarray(short.crop(layout.image)) == expected).all()
    boxes = [layout.image, layout.bar, layout.high_label, layout.low_label, layout.caption]
    for i, a in enumerate(boxes):  # nothing drawn over anything else, everything on the canvas
        assert 0 <= a[0] < a[2] <= layout.canvas[0] and 0 <= a[1] < a[3] <= layout.canvas[1]
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    text_px = layout.text_px
    assert text_px == max(10, round(max(size) * 0.025))  # 150 px letters on a 6000 px image
    for canvas in (short, long):
        assert _ink_rows(canvas, layout.caption) >= 0.5 * text_px
        assert _ink_rows(canvas, layout.high_label) >= 0.5 * text_px
        outside = np.asarray(canvas.convert("L")).copy()
        for box in boxes:
            outside[box[1]:box[3], box[0]:box[2]] = 255
        assert (outside > 200).all()  # no text spills outside its box


def test_clip_ad_fixed_scale_is_its_maps_reachable_range(b16plus_file):
    """CLIP-AD's map sums signed surgery scores: 0 (normal) is the bottom of the fixed scale and the
    top is the largest score these text vectors allow, far below the old 4."""
    import torch.nn.functional as F

    from zsadcli.core.engine import MethodSpec, build_method
    from zsadcli.core.methods.clip_ad import feature_surgery_score

    method = build_method(MethodSpec("clip-ad", backbone_file=str(b16plus_file), image_size=240,
                                     class_name="bottle", hparams={"rep_vec": "mean"})).method
    lo, hi = method.map_range
    per_layer = method.surgery_bound()
    assert lo == 0.0 and hi == pytest.approx(4 * per_layer) and 0 < per_layer < 1
    text = F.normalize(method.batch_text_features(1).float(), dim=-1)  # (1, 2, E)
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randn(1, 256, text.shape[-1], generator=gen)]
    towards = text[0, 1] - text[0, 0]  # the most anomalous direction, for CLS and patches alike
    tokens.append(towards.expand(1, 3, -1) + 0.1 * torch.randn(1, 3, text.shape[-1], generator=gen))
    tokens.append(torch.stack([towards, text[0, 1], text[0, 1] + text[0, 0]])[None])
    scores = torch.cat([feature_surgery_score(F.normalize(t, dim=-1), text) for t in tokens], dim=1)
    assert scores.abs().max() <= per_layer + 1e-6
    assert scores.max() >= 0.5 * per_layer  # the bound is of the right size, not a loose 1
    # a near-zero map renders blue on this scale (the README's promise), not the old mid-scale green
    from zsadcli.core.heatmap import normalise_map

    scaled, _ = normalise_map(np.full((4, 4), 1e-4, np.float32), "fixed", (lo, hi))
    assert scaled.max() < 0.01
