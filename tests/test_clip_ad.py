"""CLIP-AD SDP / SDP+ on a tiny GELU ViT-B-16-plus-240-shaped CLIP: parity with a plain
re-statement of the official computation for every representative-vector method, the staged
path's aliasing, transductive fusion in eval, SDP+ heads (authors' format, training, our
format) and the predict contract."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reference_clip_ad import clip_ad_reference
from tinyclip import random_fc_heads
from zsadcli.cli import app
from zsadcli.core.checkpoints import load_checkpoint, save_checkpoint
from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.core.methods import get_method
from zsadcli.core.methods.clip_ad import REP_VECS, TEMPLATES, representative_vector, state_prompts
from zsadcli.data.images import clip_preprocess, open_image
from zsadcli.errors import BadInput


@pytest.fixture(scope="module")
def images(synthetic_root):
    paths = [synthetic_root / "disc/test/stain/000.png", synthetic_root / "checker/test/good/001.png"]
    return torch.stack([clip_preprocess(open_image(p), 240) for p in paths])


def authors_heads(seed: int = 3, width: int = 128, embed: int = 32) -> dict:
    """SDP+ heads in ByChelsea/CLIP-AD's layout: {"linear_layers": {fc.i.weight, fc.i.bias}}."""
    return {"linear_layers": random_fc_heads(width, embed, seed)}


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "train_on_visa.pth"
    torch.save(authors_heads(), path)
    return path


@pytest.fixture(scope="module")
def small_data(synthetic_root, tmp_path_factory):
    """DATA_ROOT with dataset "small": the last 4 test items (normal and anomalous) of two classes."""
    from zsadcli.data.meta import load_meta, write_meta

    data = tmp_path_factory.mktemp("data")
    root = data / "small"
    meta = load_meta(synthetic_root)
    small = {"train": {}, "test": {c: meta["test"][c][-4:] for c in ("disc", "checker")}}
    for items in small["test"].values():
        for item in items:
            for rel in (item.img_path, item.mask_path):
                if rel:
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    (root / rel).write_bytes((synthetic_root / rel).read_bytes())
    write_meta(root, small)
    return data


def build(b16plus_file, method="clip-ad", ablate=(), class_name="bottle", checkpoint=None, **hparams):
    spec = MethodSpec(method, backbone_file=str(b16plus_file), image_size=240, hparams=hparams,
                      ablate=frozenset(ablate), class_name=class_name,
                      checkpoint=str(checkpoint) if checkpoint else None)
    return build_method(spec).method


@pytest.mark.parametrize("rep_vec", REP_VECS)
def test_sdp_matches_the_official_computation(b16plus_file, clip, images, rep_vec):
    with torch.no_grad():
        out = build(b16plus_file, rep_vec=rep_vec)(images)
    scores, maps = clip_ad_reference(clip, images, "bottle", rep_vec=rep_vec)
    assert out.anomaly_map.shape == (2, 240, 240)
    assert np.abs(out.anomaly_map.numpy() - maps).max() <= 1e-4
    assert (out.image_score - scores).abs().max() <= 1e-5


def test_dbscan_picks_the_largest_cluster_and_keys_on_visa(b16plus_file, clip, images):
    """eps/min_samples that split the prompts into several clusters and noise; and the VisA profile."""
    method = build(b16plus_file, dbscan_eps=0.45, dbscan_min_samples=6)
    with torch.no_grad():
        out = method(images[:1])
    scores, maps = clip_ad_reference(clip, images[:1], "bottle", eps_min=(0.45, 6))
    assert np.abs(out.anomaly_map.numpy() - maps).max() <= 1e-4
    assert (out.image_score - scores).abs().max() <= 1e-5
    default = build(b16plus_file)
    assert default.dbscan_parameters() == (0.5, 15)
    default.set_dataset("visa")  # eval names the dataset (train: set_training_dataset)
    assert default.dbscan_parameters() == (1.5, 25)
    assert build(b16plus_file, dataset="visa").dbscan_parameters() == (1.5, 25)  # predict: --hparam dataset=visa


def test_representative_vectors():
    gen = torch.Generator().manual_seed(0)
    centre = torch.nn.functional.normalize(torch.randn(32, generator=gen), dim=0)
    emb = torch.nn.functional.normalize(centre + 0.3 * torch.randn(40, 32, generator=gen), dim=-1)
    for method in REP_VECS:
        vec = representative_vector(emb, method)
        assert vec.dtype == torch.float32 and abs(float(vec.norm()) - 1) < 2e-3
        assert float(vec @ emb.mean(0)) > 0  # pca's sign is aligned with the mean
    # fp16 rounding as the official code applies it (not to mean)
    rounded = representative_vector(emb, "kde")
    exact = representative_vector(emb, "kde", fp16=False)
    assert not torch.equal(rounded, exact) and (rounded - exact).abs().max() < 2e-3
    assert torch.equal(rounded, rounded.half().float())
    # DBSCAN without any cluster: the official code fails; we fall back to the mean
    lonely = representative_vector(emb, "dbscan", dbscan=(1e-6, 3), fp16=False)
    mean = emb.mean(0)
    assert torch.allclose(lonely, mean / mean.norm(), atol=1e-6)
    with pytest.raises(BadInput):
        representative_vector(emb, "median")


def test_mean_shift_shortcut_is_what_sklearn_returns():
    from sklearn.cluster import MeanShift

    from zsadcli.core.methods.clip_ad import _largest_cluster_mean, _within

    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=-1)
    data = emb.numpy()
    assert _within(data, 2.0)
    expected = _largest_cluster_mean(data, MeanShift(bandwidth=2.0).fit(data).labels_)
    assert torch.equal(representative_vector(emb, "mean_shift", fp16=False),
                       torch.from_numpy(expected) / torch.from_numpy(expected).norm())
    antipodal = torch.cat([emb, -emb[:1]])
    assert not _within(antipodal.numpy(), 2.0)  # then sklearn itself runs
    assert representative_vector(antipodal, "mean_shift").shape == (8,)


def test_prompt_lists():
    assert len(TEMPLATES) == 22 and len(set(TEMPLATES)) == 22
    normal = state_prompts(("flawless {}",), "metal_nut")
    assert normal[0] == "a cropped photo of the flawless metal_nut." and normal[1] == "a cropped photo of a flawless metal_nut."


def test_staged_path_aliasing_and_stages(b16plus_file, images):
    method = build(b16plus_file)
    taps = method.staged_features(images[:1])
    exact = build(b16plus_file, ablate=["exact-taps"]).staged_features(images[:1])
    assert torch.equal(taps.original[12], exact.original[12]) and torch.equal(taps.surgery[12], exact.surgery[12])
    for layer in (3, 6, 9):
        assert torch.equal(taps.surgery[layer], exact.surgery[layer])  # stage ends: no aliasing of the v-v stream
        assert not torch.allclose(taps.original[layer], exact.original[layer])  # + the next block's attention
    # the aliased layer-3 state is the exact one plus block 4's attention output
    from zsadcli.core.attention import dual_attention

    block4 = method.backbone.visual.transformer.resblocks[3]
    with torch.no_grad():
        expected = exact.original[3] + dual_attention(block4, exact.original[3])[0]
    assert torch.allclose(taps.original[3], expected, atol=1e-6)


@pytest.mark.parametrize("switch", ["no-stages", "exact-taps", "no-feature-surgery", "last-layer-only", "no-smoothing"])
def test_ablation_switches_change_the_map(b16plus_file, images, switch):
    with torch.no_grad():
        base = build(b16plus_file)(images[:1])
        other = build(b16plus_file, ablate=[switch])(images[:1])
    assert not torch.allclose(base.anomaly_map, other.anomaly_map, atol=1e-7)


def test_text_features_are_cached_per_class(b16plus_file, monkeypatch):
    method = build(b16plus_file)
    calls = []
    original = method.backbone.encode_text
    monkeypatch.setattr(method.backbone, "encode_text", lambda ids: calls.append(len(ids)) or original(ids))
    image = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        method(image)
        method(image)
        assert calls == [9 * 22, 10 * 22]
        method.set_batch_class_names(["bottle", "screw"])  # a training batch mixing two classes
        method(torch.cat([image, image]))
    assert calls == [9 * 22, 10 * 22, 9 * 22, 10 * 22]


def test_transductive_fusion(b16plus_file):
    method = build(b16plus_file)
    scores = torch.tensor([0.2, 0.6, 0.4])
    maps = torch.zeros(3, 4, 4)
    maps[:, 0, 0] = torch.tensor([1.0, 3.0, 2.0])
    assert torch.equal(method.finalize_class_scores(scores, maps), scores) and method.class_scores_note() is None
    fused = build(b16plus_file, transductive=True)
    assert torch.allclose(fused.finalize_class_scores(scores, maps), torch.tensor([0.0, 2.0, 1.0]))
    assert "transductive" in fused.class_scores_note()


def test_eval_transductive_is_reported(b16plus_file, small_data, tmp_path):
    runner = CliRunner()
    common = ["eval", "--method", "clip-ad", "--test-on", "small", "--data-root", str(small_data), "--classes", "disc",
              "--backbone-file", str(b16plus_file), "--image-size", "240", "--device", "cpu", "--runs",
              str(tmp_path / "runs"), "--json"]
    plain = runner.invoke(app, [*common, "--name", "plain"])
    fused = runner.invoke(app, [*common, "--name", "fused", "--clip-ad-transductive"])
    assert plain.exit_code == 0 and fused.exit_code == 0, plain.output + fused.output
    plain_json = json.loads((tmp_path / "runs/eval/plain/metrics.json").read_text())
    fused_json = json.loads((tmp_path / "runs/eval/fused/metrics.json").read_text())
    assert not any("transductive" in n for n in plain_json["datasets"][0]["notes"])
    assert any("transductive" in n for n in fused_json["datasets"][0]["notes"])
    pixel = [j["datasets"][0]["per_class"]["disc"]["pixel"]["auroc"] for j in (plain_json, fused_json)]
    assert pixel[0] == pixel[1]  # only the image scores are fused
    refused = runner.invoke(app, ["eval", "--method", "winclip", "--test-on", "small", "--data-root", str(small_data),
                                  "--backbone-file", str(b16plus_file), "--clip-ad-transductive",
                                  "--runs", str(tmp_path / "runs")])
    assert refused.exit_code == 2


# ------------------------------------------------------------------ SDP+
@pytest.mark.parametrize("dataset,sigma", [(None, 8), ("visa", 2)])
def test_sdp_plus_matches_the_official_computation(b16plus_file, clip, images, heads_file, dataset, sigma):
    method = build(b16plus_file, method="clip-ad+", checkpoint=heads_file)
    method.set_dataset(dataset)
    assert method.sigma == sigma
    with torch.no_grad():
        out = method(images)
    scores, maps = clip_ad_reference(clip, images, "bottle", dataset=dataset or "mvtec", sigma=sigma,
                                     heads=authors_heads()["linear_layers"])
    assert np.abs(out.anomaly_map.numpy() - maps).max() <= 1e-4
    assert (out.image_score - scores).abs().max() <= 1e-5


def test_sdp_plus_training_loss_is_the_official_one(b16plus_file, clip, images, heads_file):
    from reference_clip_ad import sdp_plus_loss

    method = build(b16plus_file, method="clip-ad+", checkpoint=heads_file)
    masks = torch.zeros(2, 240, 240)
    masks[0, 60:130, 90:200] = 1
    method.train()
    method.set_batch_class_names(["bottle", "screw"])  # a batch mixing classes, as training does
    loss, parts = method.loss(method(images), masks, torch.tensor([1, 0]))
    method.set_batch_class_names(None)
    method.eval()
    expected = sdp_plus_loss(clip, images, masks, authors_heads()["linear_layers"], ["bottle", "screw"])
    assert abs(float(loss) - float(expected)) <= 1e-5 * max(1.0, float(expected))
    assert set(parts) == {"focal", "dice"}
    loss.backward()  # only the heads learn
    assert all(p.grad is not None for p in method.fc.parameters())
    assert all(p.grad is None for p in method.backbone.parameters())


def test_sdp_plus_needs_heads_and_checks_them(b16plus_file, tmp_path):
    with pytest.raises(BadInput, match="needs learned weights"):
        build(b16plus_file, method="clip-ad+")
    wrong = tmp_path / "wrong.pth"
    torch.save(authors_heads(width=64), wrong)
    with pytest.raises(BadInput, match="shape"):
        build(b16plus_file, method="clip-ad+", checkpoint=wrong)
    cls = get_method("clip-ad+")
    assert [cls.protocol_train_on(d) for d in ("mvtec", "visa", "headct", "brainmri", "isic", "mpdd")] == \
        ["visa", "mvtec", "visa", "visa", "mvtec", "mvtec"]
    assert cls.released == {"mvtec": "clip-ad-trained-on-mvtec", "visa": "clip-ad-trained-on-visa"}


def test_sdp_plus_our_format_round_trips(b16plus_file, heads_file, images, tmp_path):
    method = build(b16plus_file, method="clip-ad+", checkpoint=heads_file)
    path = save_checkpoint(tmp_path / "heads.safetensors", method.checkpoint_state(), method="clip-ad+",
                           backbone="tiny", trained_on="visa", hparams=method.hparams, epoch=5)
    assert set(load_checkpoint(path).tensors) == {f"fc.{i}.{k}" for i in range(4) for k in ("weight", "bias")}
    again = build(b16plus_file, method="clip-ad+", checkpoint=path)
    with torch.no_grad():
        a, b = method(images[:1]), again(images[:1])
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.image_score, b.image_score)


def test_sdp_plus_trains(b16plus_file, small_data, tmp_path):
    """zsad train: heads learn (loss falls), per-image class prompts, our checkpoint predicts."""
    from zsadcli.data.meta import load_meta

    runner = CliRunner()
    data, root = small_data, small_data / "small"
    small = load_meta(root)
    result = runner.invoke(app, ["train", "--method", "clip-ad+", "--on", "small", "--data-root", str(data),
                                 "--backbone-file", str(b16plus_file), "--image-size", "240", "--device", "cpu",
                                 "--epochs", "2", "--batch-size", "4", "--runs", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "runs/train/clip-ad+-small/history.json").read_text())
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    assert history[1]["loss"] < history[0]["loss"]
    config = json.loads((tmp_path / "runs/train/clip-ad+-small/config.json").read_text())
    assert config["lr"] == 1e-4 and config["seed"] == 42
    checkpoint = tmp_path / "runs/train/clip-ad+-small/epoch_2.safetensors"
    predicted = runner.invoke(app, ["predict", str(root / small["test"]["disc"][0].img_path), "--method", "clip-ad+",
                                    "--checkpoint", str(checkpoint), "--backbone-file", str(b16plus_file),
                                    "--image-size", "240", "--device", "cpu", "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert load_checkpoint(checkpoint).metadata["trained_on"] == "small"


def test_predict_contract(b16plus_file, synthetic_root, tmp_path):
    runner = CliRunner()
    image = synthetic_root / "disc/test/stain/000.png"
    raw = tmp_path / "raw"
    result = runner.invoke(app, ["predict", str(image), "--method", "clip-ad", "--backbone-file", str(b16plus_file),
                                 "--image-size", "240", "--device", "cpu", "--save-raw", str(raw), "--json",
                                 "--class-name", "object", "--rep-vec", "dbscan"])
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    saved = np.load(raw / "000.npy")
    assert saved.dtype == np.float32 and saved.shape == (240, 240)
    method = build(b16plus_file, class_name="object", rep_vec="dbscan")
    with torch.no_grad():
        out = method(clip_preprocess(open_image(image), 240)[None])
    np.testing.assert_array_equal(saved, out.anomaly_map[0].numpy())
    assert math.isclose(record["image_score"], float(out.image_score[0]), rel_tol=1e-7)
    bad = runner.invoke(app, ["predict", str(image), "--method", "clip-ad", "--backbone-file", str(b16plus_file),
                              "--rep-vec", "median"])
    assert bad.exit_code == 2


@pytest.mark.parametrize("method", ["clip-ad", "clip-ad+"])
def test_bf16_is_close_to_fp32(b16plus_file, heads_file, images, method):
    checkpoint = str(heads_file) if method == "clip-ad+" else None
    with torch.no_grad():
        exact = build(b16plus_file, method=method, checkpoint=checkpoint)(images[:1])
        spec = MethodSpec(method, backbone_file=str(b16plus_file), image_size=240, dtype=torch.bfloat16,
                          class_name="bottle", checkpoint=checkpoint)
        fast = build_method(spec).method(images[:1])
    assert (exact.image_score - fast.image_score).abs().max() < 0.05
    assert (exact.anomaly_map - fast.anomaly_map).abs().max() < 0.05 * max(1.0, float(exact.anomaly_map.abs().max()))
