"""April-GAN on a tiny exact-GELU CLIP (24 blocks, so layers 6/12/18/24 exist; native 56 px, so
the position grid is upsampled as at 518 px): parity with a plain re-statement of the official
computation (zero-shot, few-shot with the class-fused score, training loss), strict authors'
checkpoints, layer switches, the MVTec recipe (3 epochs, mosaics) and the predict contract."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reference_aprilgan import aprilgan_reference, fused_few_shot_scores, reference_memory, training_loss
from tinyclip import build_seeded_clip, random_fc_heads
from zsadcli.cli import app
from zsadcli.core.checkpoints import save_checkpoint
from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.core.methods import get_method
from zsadcli.core.methods.aprilgan import TEMPLATES, state_prompts
from zsadcli.data.images import clip_preprocess, open_image
from zsadcli.errors import BadInput


@pytest.fixture(scope="module")
def clip():
    return build_seeded_clip(0, embed_dim=32, vision_layers=24, vision_width=64, patch_size=14, image_size=56,
                             text_width=64, text_layers=2, quick_gelu=False)


@pytest.fixture(scope="module")
def backbone_file(clip, tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("aprilgan") / "tiny_gelu.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


def authors_heads(width: int = 64, embed: int = 32, seed: int = 3) -> dict:
    """Heads in the official layout: {"trainable_linearlayer": {fc.i.weight, fc.i.bias}}."""
    return {"trainable_linearlayer": random_fc_heads(width, embed, seed)}


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "visa_pretrained.pth"
    torch.save(authors_heads(), path)
    return path


@pytest.fixture(scope="module")
def paths(synthetic_root):
    return [synthetic_root / "disc/test/stain/000.png", synthetic_root / "disc/test/good/001.png",
            synthetic_root / "disc/test/stain/001.png"]


@pytest.fixture(scope="module")
def method(backbone_file, heads_file):
    """Built once: its per-class text features are cached for the tests that reuse it."""
    return build(backbone_file, heads_file)


def build(backbone_file, checkpoint, size=84, ablate=(), class_name="bottle", **hparams):
    spec = MethodSpec("aprilgan", backbone_file=str(backbone_file), checkpoint=str(checkpoint) if checkpoint else None,
                      image_size=size, hparams=hparams, ablate=frozenset(ablate), class_name=class_name)
    return build_method(spec).method


def batch(paths, size):
    return torch.stack([clip_preprocess(open_image(p), size) for p in paths])


@pytest.mark.parametrize("size,count", [(84, 2), (112, 1)])
def test_zero_shot_matches_the_official_computation(method, clip, paths, size, count):
    images = batch(paths[:count], size)
    assert method.backbone.quick_gelu is False and method.position_interpolation == "bicubic+antialias"
    with torch.no_grad():
        out = method(images)
    scores, maps = aprilgan_reference(clip, images, authors_heads()["trainable_linearlayer"], "bottle")
    assert out.anomaly_map.shape == (count, size, size)
    assert np.abs(out.anomaly_map.numpy() - maps).max() <= 1e-4
    assert (out.image_score - scores).abs().max() <= 1e-5
    assert method.map_range == (0.0, 4.0) and 0 <= float(out.anomaly_map.min()) <= float(out.anomaly_map.max()) <= 4


def test_predict_contract_with_the_authors_heads(backbone_file, heads_file, clip, paths, tmp_path):
    """The checked interface: --checkpoint in the authors' format, --class-name, --save-raw, --json."""
    raw = tmp_path / "raw"
    result = CliRunner().invoke(app, ["predict", str(paths[0]), "--method", "aprilgan", "--backbone-file",
                                      str(backbone_file), "--checkpoint", str(heads_file), "--image-size", "112",
                                      "--device", "cpu", "--save-raw", str(raw), "--json", "--class-name", "bottle"])
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    scores, maps = aprilgan_reference(clip, batch(paths[:1], 112), authors_heads()["trainable_linearlayer"], "bottle")
    saved = np.load(raw / f"{paths[0].stem}.npy")
    assert saved.dtype == np.float32 and saved.shape == (112, 112)
    assert np.abs(saved - maps[0]).max() <= 1e-4 and abs(record["image_score"] - float(scores[0])) <= 1e-5


def test_few_shot_memory_and_class_fused_score(backbone_file, heads_file, clip, paths, synthetic_root, tmp_path):
    refs = [synthetic_root / "disc/train/good/000.png", synthetic_root / "disc/train/good/001.png"]
    for path in refs:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    method = build(backbone_file, heads_file, reference=str(tmp_path))
    images = batch(paths, 84)
    with torch.no_grad():
        out = method(images)
    memory = reference_memory(clip, batch(refs, 84))
    scores, maps = aprilgan_reference(clip, images, authors_heads()["trainable_linearlayer"], "bottle", memory=memory)
    assert np.abs(out.anomaly_map.numpy() - maps).max() <= 1e-4
    assert (out.image_score - scores).abs().max() <= 1e-5  # per image: the zero-shot score
    fused = method.finalize_class_scores(out.image_score, out.anomaly_map)  # eval, over the whole class
    assert np.abs(fused.numpy() - fused_few_shot_scores(scores.numpy(), maps)).max() <= 1e-5
    assert "few-shot" in method.class_scores_note() and method.map_range == (0.0, 12.0)
    zero = build(backbone_file, heads_file, reference=str(tmp_path), ablate=["no-few-shot"])
    assert not zero.few_shot and zero.map_range == (0.0, 4.0) and zero.class_scores_note() is None
    assert torch.equal(zero.finalize_class_scores(out.image_score, out.anomaly_map), out.image_score)


def test_layer_switches(backbone_file, heads_file, clip, paths):
    listed = CliRunner().invoke(app, ["ablate", "--method", "aprilgan", "--list", "--json"])
    assert listed.exit_code == 0
    assert set(json.loads(listed.stdout)) == {"no-few-shot", "no-layer-6", "no-layer-12", "no-layer-18", "no-layer-24"}
    images = batch(paths[:1], 84)
    method = build(backbone_file, heads_file, ablate=["no-layer-24"])
    with torch.no_grad():
        out = method(images)
    _, maps = aprilgan_reference(clip, images, authors_heads()["trainable_linearlayer"], "bottle", active=(0, 1, 2))
    assert np.abs(out.anomaly_map.numpy() - maps).max() <= 1e-4 and method.map_range == (0.0, 3.0)
    with pytest.raises(BadInput, match="every tapped layer"):
        build(backbone_file, heads_file, ablate=["no-layer-6", "no-layer-12", "no-layer-18", "no-layer-24"])


def test_training_loss_is_the_official_one(backbone_file, heads_file, clip, paths):
    images = batch(paths[:2], 84)
    masks = torch.zeros(2, 84, 84)
    masks[0, 20:50, 30:70] = 1
    method = build(backbone_file, heads_file)
    method.train()
    method.set_batch_class_names(["bottle", "metal_nut"])  # a batch mixing classes, as training does
    loss, parts = method.loss(method(images), masks, torch.tensor([1, 0]))
    method.set_batch_class_names(None)
    expected = training_loss(clip, images, masks, authors_heads()["trainable_linearlayer"], ["bottle", "metal_nut"])
    assert abs(loss.item() - expected.item()) <= 1e-5 * max(1.0, expected.item())
    assert set(parts) == {"focal", "dice"}
    loss.backward()  # only the heads learn
    assert all(p.grad is not None for p in method.fc.parameters())
    assert all(p.grad is None for p in method.backbone.parameters())
    method.eval()


def test_authors_checkpoint_is_strict_and_ours_round_trips(backbone_file, heads_file, method, tmp_path):
    with pytest.raises(BadInput, match="needs learned weights"):
        build(backbone_file, None)
    wrong_width = tmp_path / "wrong.pth"
    torch.save(authors_heads(width=128), wrong_width)
    with pytest.raises(BadInput, match="shape"):
        build(backbone_file, wrong_width)
    extra = authors_heads()
    extra["trainable_linearlayer"]["fc.4.weight"] = torch.zeros(32, 64)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(BadInput, match="keys"):
        build(backbone_file, tmp_path / "extra.pth")
    torch.save({"linear_layers": authors_heads()["trainable_linearlayer"]}, tmp_path / "clipad.pth")
    with pytest.raises(BadInput, match="does not hold aprilgan"):
        build(backbone_file, tmp_path / "clipad.pth")
    imported = method.checkpoint_state()
    assert imported.keys() == authors_heads()["trainable_linearlayer"].keys()
    assert all(torch.equal(imported[k], v) for k, v in authors_heads()["trainable_linearlayer"].items())
    ours = save_checkpoint(tmp_path / "heads.safetensors", imported, method="aprilgan",
                           backbone="tiny", trained_on="visa", hparams=method.hparams, epoch=15)
    again = build(backbone_file, ours).checkpoint_state()
    assert again.keys() == imported.keys() and all(torch.equal(again[k], imported[k]) for k in imported)


def test_recipe_protocol_and_released_weights():
    from zsadcli.core.hub import load_registry

    cls = get_method("aprilgan")
    assert (cls.recipe.lr, cls.recipe.betas, cls.recipe.batch_size, cls.recipe.seed) == (1e-3, (0.5, 0.999), 8, 111)
    assert [cls.recipe.epochs_for(d) for d in ("mvtec", "visa")] == [3, 15]
    assert [cls.recipe.mosaic_rate_for(d) for d in ("mvtec", "visa")] == [0.2, 0.0]
    assert [cls.protocol_train_on(d) for d in ("mvtec", "visa", "mpdd")] == ["visa", "mvtec", "mvtec"]
    registry = load_registry()
    for trained_on, key in cls.released.items():
        entry = registry[key]
        assert entry.extra == {"method": "aprilgan", "trained_on": trained_on} and len(entry.git_blob) == 40
        assert "/raw/f13b8a634e04f9fde8fa03db125b25af5695d8e1/exps/pretrained/" in entry.url
    assert len(TEMPLATES) == len(set(TEMPLATES)) == 35
    assert state_prompts(("{} with flaw",), "metal_nut")[0] == "a bad photo of a metal_nut with flaw."


def test_mosaics_are_seeded_same_class_and_stitch_the_masks(synthetic_root):
    from zsadcli.data.dataset import MetaDataset
    from zsadcli.data.images import load_mask, mask_to_tensor
    from zsadcli.data.meta import load_meta
    from zsadcli.data.mosaic import MosaicDataset, stitch

    meta = load_meta(synthetic_root)
    items = [i for cls in ("disc", "checker") for i in meta["test"][cls]]
    base = MetaDataset(synthetic_root, items, lambda im: clip_preprocess(im, 56), 56)
    first, second = MosaicDataset(base, 1.0, seed=111), MosaicDataset(base, 1.0, seed=111)
    samples = [first[i] for i in range(len(items))]
    assert [s["path"] for s in samples] == [second[i]["path"] for i in range(len(items))]  # seeded
    assert [first[i]["path"] for i in range(len(items))] == [s["path"] for s in samples]  # same epoch, same draws
    first.set_epoch(2)
    assert [first[i]["path"] for i in range(len(items))] != [s["path"] for s in samples]  # new draws each epoch
    stitched_anomalies = 0
    for item, sample in zip(items, samples):
        picks = sample["path"][len("mosaic:"):].split("|")
        assert len(picks) == 4 and all(p.startswith(f"{item.cls_name}/") for p in picks)
        assert sample["cls_name"] == item.cls_name and sample["label"] == item.anomaly  # the official keeps both
        by_path = {i.img_path: i for i in items}
        masks = [load_mask(synthetic_root / by_path[p].mask_path if by_path[p].anomaly else None, 64) for p in picks]
        from PIL import Image

        expected = stitch([Image.fromarray(m.numpy().astype(np.uint8) * 255) for m in masks], "L")
        assert torch.equal(sample["mask"], mask_to_tensor(expected, 56))
        assert sample["image"].shape == (3, 56, 56)
        stitched_anomalies += bool(sample["mask"].any())
    assert stitched_anomalies > 0
    plain = MosaicDataset(base, 0.0, seed=111)
    assert torch.equal(plain[0]["image"], base[0]["image"]) and plain[0]["path"] == base[0]["path"]


def test_train_on_mvtec_uses_the_recipe_then_predict(backbone_file, clip, synthetic_root, tmp_path):
    """`zsad train --on mvtec`: 3 epochs with mosaics by default; its checkpoint drives the checked interface."""
    from zsadcli.data.meta import load_meta, write_meta

    root = tmp_path / "data" / "mvtec"
    meta = load_meta(synthetic_root)
    small = {"train": {}, "test": {c: meta["test"][c][-2:] for c in ("disc", "checker")}}
    for items in small["test"].values():
        for item in items:
            for rel in (item.img_path, item.mask_path):
                if rel:
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    (root / rel).write_bytes((synthetic_root / rel).read_bytes())
    write_meta(root, small)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--method", "aprilgan", "--on", "mvtec", "--data-root", str(tmp_path / "data"),
                                 "--backbone-file", str(backbone_file), "--image-size", "56", "--device", "cpu",
                                 "--batch-size", "4", "--runs", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/train/aprilgan-mvtec"
    config = json.loads((run / "config.json").read_text())
    assert (config["epochs"], config["mosaic_rate"], config["lr"], config["seed"]) == (3, 0.2, 1e-3, 111)
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    image = root / small["test"]["disc"][-1].img_path
    raw = tmp_path / "raw"
    predicted = runner.invoke(app, ["predict", str(image), "--method", "aprilgan", "--backbone-file", str(backbone_file),
                                    "--checkpoint", str(run / "epoch_3.safetensors"), "--image-size", "56",
                                    "--device", "cpu", "--save-raw", str(raw), "--json", "--class-name", "bottle"])
    assert predicted.exit_code == 0, predicted.output
    [record] = [json.loads(line) for line in predicted.stdout.splitlines() if line.startswith("{")]
    from zsadcli.core.checkpoints import load_checkpoint

    trained = load_checkpoint(run / "epoch_3.safetensors")
    assert trained.method == "aprilgan" and trained.metadata["trained_on"] == "mvtec"
    scores, maps = aprilgan_reference(clip, batch([image], 56), trained.tensors, "bottle")
    saved = np.load(raw / f"{image.stem}.npy")
    assert saved.dtype == np.float32 and saved.shape == (56, 56)
    assert np.abs(saved - maps[0]).max() <= 1e-4 and abs(record["image_score"] - float(scores[0])) <= 1e-5


def test_calibrate_then_predict_decisions(backbone_file, heads_file, synthetic_root, tmp_path):
    """`zsad calibrate` works for April-GAN like for every method: the card's thresholds label predict's images."""
    weights = ["--method", "aprilgan", "--backbone-file", str(backbone_file), "--checkpoint", str(heads_file),
               "--image-size", "56", "--device", "cpu", "--class-name", "disc"]
    good = str(synthetic_root / "disc/test/good")
    runner = CliRunner()
    made = runner.invoke(app, ["calibrate", *weights, "--normal", good, "--target-fpr", "0.2",
                               "--out", str(tmp_path / "card.json")])
    assert made.exit_code == 0, made.output
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["method"] == "aprilgan" and np.isfinite(card["image_threshold"])
    images = [str(p) for p in sorted((synthetic_root / "disc/test").rglob("*.png"))[:4]]
    result = runner.invoke(app, ["predict", *images, *weights, "--calibration", str(tmp_path / "card.json"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 4
    assert all(r["label"] == ("anomalous" if r["image_score"] >= r["threshold"] else "normal") for r in records)
