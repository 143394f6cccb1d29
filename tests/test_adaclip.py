"""AdaCLIP on the tiny CLIP (run with exact GELU, as the method declares): parity with a plain
re-statement of the official computation (maps, scores, HSF clusters, training loss), batching,
the authors' checkpoint format (strict), ablations, multi-dataset training through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reference_adaclip import adaclip_reference, adaclip_train_loss_reference
from tinyclip import tiny_state_dict
from zsadcli.cli import app
from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.data.images import clip_preprocess, open_image
from zsadcli.data.meta import load_meta
from zsadcli.errors import BadInput

SIZE = 168  # 12 x 12 patches: more than the 100 HSF takes


@pytest.fixture(scope="module")
def sd():
    return tiny_state_dict(0)


def authors_checkpoint(sd, seed: int = 3, length: int = 5, depth: int = 4) -> dict:
    """The official trainer's saved dict (``clip_model.``-prefixed learnable entries) with
    trained-looking random values, sized for the tiny CLIP."""
    gen = torch.Generator().manual_seed(seed)
    vision, text = sd["visual.conv1.weight"].shape[0], sd["ln_final.weight"].shape[0]
    embed = sd["text_projection"].shape[1]
    ck = {}

    def linear(name, dim_in, dim_out, scale=1.0):
        ck[f"clip_model.{name}.weight"] = scale * torch.randn(dim_out, dim_in, generator=gen) / dim_in ** 0.5
        ck[f"clip_model.{name}.bias"] = 0.05 * torch.randn(dim_out, generator=gen)

    for i in range(depth):
        ck[f"clip_model.text_prompter.static_prompts.{i}"] = 0.3 * torch.randn(length, text, generator=gen)
        ck[f"clip_model.visual_prompter.static_prompts.{i}"] = 0.3 * torch.randn(length, vision, generator=gen)
    for i in range(4):
        linear(f"patch_token_layer.head.{i}", vision, embed)
    linear("cls_token_layer.head.0", embed, embed)
    for i in range(length):
        linear(f"dynamic_visual_prompt_generator.head.{i}", embed, vision, 0.5)
        linear(f"dynamic_text_prompt_generator.head.{i}", embed, text, 0.5)
    return ck


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory, sd):
    path = tmp_path_factory.mktemp("adaclip") / "pretrained_mvtec_colondb.pth"
    torch.save(authors_checkpoint(sd), path)
    return path


def build(tiny_registry, checkpoint=None, size: int = SIZE, ablate=(), hparams=None, **kwargs):
    spec = MethodSpec("adaclip", backbone_file=str(tiny_registry["payload"]),
                      checkpoint=str(checkpoint) if checkpoint else None, image_size=size, ablate=frozenset(ablate),
                      hparams=dict(hparams or {}), require_weights=checkpoint is not None, **kwargs)
    return build_method(spec).method


@pytest.fixture(scope="module")
def images(synthetic_root):
    items = load_meta(synthetic_root)["test"]["disc"][3:5]
    clean = torch.stack([clip_preprocess(open_image(synthetic_root / it.img_path).convert("RGB"), SIZE)
                         for it in items])
    # a little noise: flat synthetic backgrounds give exactly tied patches, whose top-k order
    # (and so the KMeans input order) is arbitrary
    return clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))


def test_batch_matches_the_official_computation_per_image(tiny_registry, sd, authors_file, images):
    """Batch of 2 (ours) against two batch-1 runs of the re-statement: maps, scores and the
    HSF clusters; the method runs exact GELU and a bicubic grid."""
    method = build(tiny_registry, authors_file, class_name="disc")
    assert method.backbone.quick_gelu is False and method.position_interpolation == "bicubic"
    with torch.no_grad():
        out = method(images)
    ref_scores, ref_maps, ref_labels = adaclip_reference(sd, authors_checkpoint(sd), images, class_name="disc")
    assert out.anomaly_map.shape == (2, SIZE, SIZE) and out.image_score.shape == (2,)
    assert np.abs(out.anomaly_map.numpy() - ref_maps).max() <= 1e-4
    assert (out.image_score - ref_scores).abs().max() <= 1e-5
    for ours, ref in zip(out.extras["hsf_labels"], ref_labels):
        assert ours.shape == (100,) and np.array_equal(ours, ref)
    assert ref_scores.std() > 1e-3 and ref_maps.std() > 1e-3  # a test that can fail


def test_no_hsf_scores_with_the_cls_head_alone(tiny_registry, sd, authors_file, images):
    small = torch.nn.functional.interpolate(images[:1], size=(112, 112), mode="bilinear")
    with torch.no_grad():
        out = build(tiny_registry, authors_file, size=112, ablate=["no-hsf"])(small)
    ref_scores, ref_maps, _ = adaclip_reference(sd, authors_checkpoint(sd), small, use_hsf=False)
    assert (out.image_score - ref_scores).abs().max() <= 1e-5
    assert np.abs(out.anomaly_map.numpy() - ref_maps).max() <= 1e-4
    assert "hsf_labels" not in out.extras


def test_loss_equals_the_official_training_objective(tiny_registry, sd, authors_file, images):
    method = build(tiny_registry, authors_file, size=112).train()
    image = torch.nn.functional.interpolate(images[1:2], size=(112, 112), mode="bilinear")
    gt = torch.zeros(1, 112, 112)
    gt[0, 30:70, 40:90] = 1
    out = method(image)
    loss, parts = method.loss(out, gt.bool(), torch.tensor([1]))
    ref = adaclip_train_loss_reference(sd, authors_checkpoint(sd), image[0], gt, 1)
    assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    assert set(parts) == {"map", "image"}
    loss.backward()
    dead = "parts.text_prompter.static_prompts.0"  # block 1 of the text tower is never prompted
    grads = {n: p.grad for n, p in method.named_parameters() if p.requires_grad}
    assert grads.pop(dead) is None
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not any(p.requires_grad for p in method.backbone.parameters())
    optimizer = method.make_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.01, (0.5, 0.999), 0.01)


def test_ablation_switches_change_the_output(tiny_registry, authors_file, images):
    small = torch.nn.functional.interpolate(images[:1], size=(112, 112), mode="bilinear")
    with torch.no_grad():
        base = build(tiny_registry, authors_file, size=112)(small)
        for switch in ("no-dynamic", "no-static", "no-hsf", "vision-only", "text-only"):
            other = build(tiny_registry, authors_file, size=112, ablate=[switch])(small)
            assert not torch.allclose(base.image_score, other.image_score, atol=1e-7), switch
            if switch != "no-hsf":
                assert not torch.allclose(base.anomaly_map, other.anomaly_map, atol=1e-6), switch
    with pytest.raises(BadInput, match="static or dynamic"):
        build(tiny_registry, authors_file, size=112, ablate=["no-static", "no-dynamic"])


def test_vision_only_encodes_the_text_once_per_class(tiny_registry, authors_file, monkeypatch):
    method = build(tiny_registry, authors_file, size=56, ablate=["vision-only"])
    calls = []
    original = method.backbone.encode_text_embeddings
    monkeypatch.setattr(method.backbone, "encode_text_embeddings",
                        lambda emb, *a, **k: calls.append((emb.shape[0], a[1] if len(a) > 1 else k.get("deep_prompts")))
                        or original(emb, *a, **k))
    with torch.no_grad():
        for b in (1, 2):
            method(torch.randn(b, 3, 56, 56))
    assert calls == [(48, None)]  # 7 x 4 normal + 5 x 4 abnormal sentences, no deep prompts


def test_authors_checkpoint_is_loaded_strictly(tmp_path, tiny_registry, sd):
    good = authors_checkpoint(sd, length=3, depth=2)
    torch.save(good, tmp_path / "short.pth")
    method = build(tiny_registry, tmp_path / "short.pth")
    assert (method.hparams["prompt_length"], method.hparams["prompt_depth"]) == (3, 2)
    bad = authors_checkpoint(sd)
    bad["clip_model.cls_token_layer.head.0.weight"] = torch.zeros(5, 5)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(BadInput, match="shape"):
        build(tiny_registry, tmp_path / "shape.pth")
    misnamed = authors_checkpoint(sd)
    misnamed["clip_model.cls_token_layer.head.0.wieght"] = misnamed.pop("clip_model.cls_token_layer.head.0.weight")
    torch.save(misnamed, tmp_path / "misnamed.pth")
    with pytest.raises(BadInput, match="keys"):
        build(tiny_registry, tmp_path / "misnamed.pth")
    torch.save({k[len("clip_model."):]: v for k, v in authors_checkpoint(sd).items()}, tmp_path / "bare.pth")
    with pytest.raises(BadInput, match="adaclip"):
        build(tiny_registry, tmp_path / "bare.pth")


def test_predict_cli_with_authors_checkpoint(tiny_registry, sd, authors_file, synthetic_root, tmp_path):
    """The interface a check drives: --backbone-file, authors' --checkpoint, --save-raw, --json."""
    paths = [synthetic_root / f"disc/test/{d}/00{i}.png" for d, i in (("good", 0), ("stain", 1))]
    result = CliRunner().invoke(app, ["predict", *map(str, paths), "--method", "adaclip", "--backbone-file",
                                      str(tiny_registry["payload"]), "--checkpoint", str(authors_file),
                                      "--image-size", "112", "--device", "cpu", "--save-raw", str(tmp_path / "raw"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    batch = torch.stack([clip_preprocess(open_image(p).convert("RGB"), 112) for p in paths])
    ref_scores, ref_maps, _ = adaclip_reference(sd, authors_checkpoint(sd), batch)
    assert len(records) == 2
    for record, score, amap in zip(records, ref_scores, ref_maps):
        saved = np.load(tmp_path / "raw" / (record["path"].rsplit("/", 1)[1][:-4] + ".npy"))
        assert saved.shape == (112, 112) and np.abs(saved - amap).max() <= 1e-4
        assert abs(record["image_score"] - float(score)) <= 1e-5


def test_train_on_a_pair_of_datasets(tmp_path):
    """`--on a,b` trains on the concatenated test splits of both (the official auxiliary pair)."""
    from zsadcli.core.checkpoints import load_checkpoint
    from zsadcli.data.meta import write_meta
    from zsadcli.data.synthetic import generate_synthetic

    data_root = tmp_path / "data"
    for name, cls, seed in (("aux1", "disc", 0), ("aux2", "checker", 1)):
        write_meta(data_root / name, generate_synthetic(data_root / name, seed=seed, classes=(cls,), size=64,
                                                        n_train=0, n_test_good=1, n_per_defect=1))
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", "--method", "adaclip", "--on", "aux1,aux2", "--data-root",
                                      str(data_root), "--epochs", "1", "--name", "a", "--runs", str(runs),
                                      "--backbone", "tiny-clip", "--image-size", "56", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads((runs / "train" / "a" / "config.json").read_text())
    expected = sum(len(v) for d in ("aux1", "aux2") for v in load_meta(data_root / d)["test"].values())
    assert config["items"] == expected and config["trained_on"] == "aux1,aux2"
    loaded = load_checkpoint(runs / "train" / "a" / "epoch_1.safetensors")
    assert loaded.method == "adaclip" and loaded.metadata["trained_on"] == "aux1,aux2"
    missing = CliRunner().invoke(app, ["train", "--method", "adaclip", "--on", "aux1,nope", "--data-root",
                                       str(data_root), "--runs", str(runs), "--backbone", "tiny-clip", "--image-size",
                                       "56", "--device", "cpu"])
    assert missing.exit_code == 2 and "nope" in missing.output


def test_released_checkpoints_and_protocol():
    from zsadcli.core import hub
    from zsadcli.core.methods import get_method

    cls = get_method("adaclip")
    registry = hub.load_registry()
    for trained_on, sha in (("mvtec,colondb", "be51a42c052bd4cf060e54f503a1f5d0b2a3b899bc8dc2e243042f18b215427e"),
                            ("visa,clinicdb", "3deabbbaf1e412cfdfcb42923a500b986f4b9ee96ccbc7a735d89dbc87df44c8"),
                            ("all", "33e8d3db1cb4aab030866b8b70a46e10aa27ebf2c23b5463cb07f2574addd98c")):
        entry = registry[cls.released[trained_on]]
        assert entry.sha256 == sha and entry.extra["method"] == "adaclip" and entry.format == "authors"
    assert cls.protocol_train_on("mvtec") == cls.protocol_train_on("colondb") == "visa,clinicdb"
    assert cls.protocol_train_on("visa") == cls.protocol_train_on("btad") == "mvtec,colondb"


def test_calibrate_then_predict_decisions(tiny_registry, authors_file, synthetic_root, tmp_path):
    """`zsad calibrate` works for AdaCLIP like for every method: the card's thresholds label predict's images."""
    weights = ["--method", "adaclip", "--backbone-file", str(tiny_registry["payload"]), "--checkpoint",
               str(authors_file), "--image-size", "112", "--device", "cpu"]
    runner = CliRunner()
    made = runner.invoke(app, ["calibrate", *weights, "--normal", str(synthetic_root / "disc/test/good"),
                               "--target-fpr", "0.2", "--out", str(tmp_path / "card.json")])
    assert made.exit_code == 0, made.output
    images = [str(p) for p in sorted((synthetic_root / "disc/test").rglob("*.png"))[:3]]
    result = runner.invoke(app, ["predict", *images, *weights, "--calibration", str(tmp_path / "card.json"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 3
    assert all(r["label"] == ("anomalous" if r["image_score"] >= r["threshold"] else "normal") for r in records)
