"""Crane and Crane+ on tiny models: parity with a plain re-statement of the official computation
(reference_crane.py), D-Attn batch behaviour, DINOv2 loading, the authors' released checkpoints,
checkpoint formats, ablations, per-dataset settings, the training loss and a short training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.tokenizer import tokenize
from typer.testing import CliRunner

from reference_crane import crane_reference, crane_reference_loss, dino_features
from tinyclip import build_tiny_open_clip
from tinydino import tiny_dinov2_state_dict
from zsadcli.cli import app
from zsadcli.core.backbone import backbone_from_state_dict
from zsadcli.core.checkpoints import load_checkpoint, save_checkpoint
from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.core.methods import get_method
from zsadcli.core.methods.crane import DinoFeatures, dinov2_to_timm
from zsadcli.data.images import clip_preprocess, open_image
from zsadcli.data.meta import load_meta, write_meta
from zsadcli.data.synthetic import generate_synthetic
from zsadcli.errors import BadInput

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RELEASED = SHARED / "weights" / "crane"
RELEASED_FILES = {  # file -> (method, trained on)
    "trained_on_mvtec_crane/epoch_5.pth": ("crane", "mvtec"),
    "trained_on_visa_crane/epoch_5.pth": ("crane", "visa"),
    "trained_on_mvtec_cranep/epoch_5.pth": ("crane+", "mvtec"),
    "trained_on_visa_cranep/epoch_5.pth": ("crane+", "visa"),
    "trained_on_mvtec_cranep/epoch_1.pth": ("crane+", "mvtec-epoch1"),
    "trained_on_visa_cranep/epoch_1.pth": ("crane+", "visa-epoch1"),
}


def crane_checkpoint(seed: int = 1, width: int = 64, clip=None) -> dict:
    """A prompt learner in AlirezaSalehy/Crane's layout (AnomalyCLIP's keys without projections)."""
    clip = clip or build_tiny_open_clip(seed=0)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for s, template in (("pos", "object."), ("neg", "damaged object.")):
        ids = tokenize([" ".join(["X"] * 12) + " " + template])
        emb = clip.token_embedding(ids).detach()
        state[f"ctx_{s}"] = 0.3 * torch.randn(1, 1, 12, width, generator=gen)
        state[f"token_prefix_{s}"] = emb[None, :, :1].clone()
        state[f"token_suffix_{s}"] = emb[None, :, 13:].clone()
        state[f"tokenized_prompts_{s}"] = ids[None].int()
    for i in range(8):
        state[f"compound_prompts_text.{i}"] = 0.3 * torch.randn(4, width, generator=gen)
    return {"prompt_learner": state}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_registry) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crane")
    paths = {"ckpt": root / "epoch_5.pth", "dino": root / "dinov2_tiny_reg4_pretrain.pth"}
    torch.save(crane_checkpoint(), paths["ckpt"])
    torch.save(tiny_dinov2_state_dict(seed=0, grid=16), paths["dino"])  # native 224 px
    return paths


def build(name, files, size=112, ablate=(), hparams=None, **kwargs):
    hp = dict(hparams or {})
    if name == "crane+":
        hp.setdefault("dino_file", str(files["dino"]))
    spec = MethodSpec(name, backbone="tiny-clip", checkpoint=str(files["ckpt"]), image_size=size,
                      ablate=frozenset(ablate), hparams=hp, **kwargs)
    return build_method(spec).method


def images_of(root, n=3, size=112, cls="disc"):
    items = load_meta(root)["test"][cls][:n]
    return torch.stack([clip_preprocess(open_image(root / it.img_path), size) for it in items])


# ------------------------------------------------------------------ parity with the official computation
@pytest.mark.parametrize("name", ["crane", "crane+"])
def test_matches_the_official_computation_at_batch_1(files, synthetic_root, name):
    method = build(name, files)
    images = images_of(synthetic_root)
    clip = build_tiny_open_clip(seed=0)
    pl = crane_checkpoint()["prompt_learner"]
    dino = tiny_dinov2_state_dict(seed=0, grid=16) if name == "crane+" else None
    for image in images[:2]:  # batch 1, where the per-image and the official batch-wide means agree
        with torch.no_grad():
            out = method(image[None])
        ref_score, ref_map = crane_reference(clip, pl, image[None], layers=(24,) if dino else (6, 12, 18, 24),
                                             dino_state=dino, soft_mean=name == "crane")
        assert out.anomaly_map.shape == (1, 112, 112)
        assert np.abs(out.anomaly_map.numpy() - ref_map).max() <= 1e-4
        assert (out.image_score - ref_score).abs().max() <= 1e-5


def test_crane_plus_batch_mean_matches_the_official_batch_computation(files, synthetic_root):
    method = build("crane+", files, hparams={"dattn_mean": "batch", "soft_mean": True})
    images = images_of(synthetic_root, n=3)
    with torch.no_grad():
        out = method(images)
    ref_scores, ref_maps = crane_reference(build_tiny_open_clip(seed=0), crane_checkpoint()["prompt_learner"], images,
                                           layers=(24,), dino_state=tiny_dinov2_state_dict(seed=0, grid=16),
                                           soft_mean=True, batch_mean=True)
    assert np.abs(out.anomaly_map.numpy() - ref_maps).max() <= 1e-4
    assert (out.image_score - ref_scores).abs().max() <= 1e-5


def test_per_image_mean_makes_batches_irrelevant(files, synthetic_root):
    images = torch.cat([images_of(synthetic_root, n=2), images_of(synthetic_root, n=2, cls="checker")])
    method = build("crane+", files)
    with torch.no_grad():
        together = method(images)
        alone = [method(image[None]) for image in images]
    assert torch.allclose(together.image_score, torch.cat([o.image_score for o in alone]), atol=1e-6, rtol=0)
    assert torch.allclose(together.anomaly_map, torch.cat([o.anomaly_map for o in alone]), atol=1e-5, rtol=0)
    # the authors' batch-wide mean does depend on what else is in the batch
    batch_mean = build("crane+", files, hparams={"dattn_mean": "batch"})
    with torch.no_grad():
        mixed = batch_mean(images)
    assert not torch.allclose(mixed.anomaly_map, together.anomaly_map, atol=1e-5)


def test_dinov2_features_match_the_hub_semantics_and_both_key_layouts(files):
    state = tiny_dinov2_state_dict(seed=0, grid=16)
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    hub_layout = DinoFeatures(state, "facebookresearch")
    timm_layout = DinoFeatures(dinov2_to_timm(dict(state)), "timm")
    with torch.no_grad():
        expected = dino_features(state, images)  # off the native grid: position grid resized
        assert torch.allclose(hub_layout(images), expected, atol=1e-5, rtol=0)
        assert torch.equal(hub_layout(images), timm_layout(images))
        native = torch.randn(1, 3, 224, 224)
        assert torch.allclose(hub_layout(native), dino_features(state, native), atol=1e-5, rtol=0)
    assert hub_layout(images).shape == (2, 64, 8, 8)


def test_dino_file_errors_and_registry_miss(files, tmp_path, synthetic_root):
    bad = tmp_path / "notdino.pth"
    torch.save({"w": torch.zeros(2)}, bad)
    with pytest.raises(BadInput, match="not a DINOv2"):
        build("crane+", files, hparams={"dino_file": str(bad)})
    with pytest.raises(BadInput, match="does not exist"):
        build("crane+", files, hparams={"dino_file": str(tmp_path / "absent.pth")})
    runner = CliRunner()
    image = str(synthetic_root / "disc/test/good/000.png")
    offline = runner.invoke(app, ["predict", image, "--method", "crane+", "--backbone", "tiny-clip", "--checkpoint",
                                  str(files["ckpt"]), "--image-size", "56", "--device", "cpu"])
    assert offline.exit_code == 3 and "dinov2-vitb14-reg4" in offline.output
    # --dino-file belongs to Crane+ only
    plain = runner.invoke(app, ["predict", image, "--method", "crane", "--backbone", "tiny-clip", "--checkpoint",
                                str(files["ckpt"]), "--dino-file", str(files["dino"]), "--image-size", "56"])
    assert plain.exit_code == 2


def test_predict_cli_contract(files, synthetic_root, tmp_path):
    runner = CliRunner()
    image = synthetic_root / "disc/test/stain/000.png"
    result = runner.invoke(app, ["predict", str(image), "--method", "crane+", "--backbone", "tiny-clip", "--checkpoint",
                                 str(files["ckpt"]), "--dino-file", str(files["dino"]), "--image-size", "112",
                                 "--device", "cpu", "--save-raw", str(tmp_path / "raw"), "--json"])
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    saved = np.load(tmp_path / "raw" / "000.npy")
    assert saved.shape == (112, 112) and saved.dtype == np.float32
    assert abs(record["map_max"] - float(saved.max())) <= 1e-6 and 0 <= record["image_score"] <= 1
    with torch.no_grad():
        expected = build("crane+", files)(clip_preprocess(open_image(image), 112)[None])
    np.testing.assert_array_equal(saved, expected.anomaly_map[0].numpy())
    assert record["image_score"] == pytest.approx(float(expected.image_score[0]), abs=1e-7)


# ------------------------------------------------------------------ settings and switches
def test_soft_mean_follows_the_authors_test_script(files):
    crane, plus = build("crane", files, size=56), build("crane+", files, size=56)
    assert crane.soft_mean and not plus.soft_mean  # predict: no dataset, industrial setting
    for dataset, expected in (("dagm", True), ("DAGM_KaggleUpload", True), ("headct", True), ("cvc-colondb", True),
                              ("isic", True), ("visa", False), ("mvtec", False), ("btad", False)):
        plus.set_dataset(dataset)
        crane.set_dataset(dataset)
        assert plus.soft_mean is expected and crane.soft_mean
    explicit = build("crane+", files, size=56, hparams={"soft_mean": True})
    assert explicit.soft_mean
    cls = get_method("crane+")
    assert [cls.protocol_train_on(d) for d in ("mvtec", "visa", "dagm", "brainmri", "tn3k")] == \
        ["visa", "mvtec", "mvtec", "mvtec-epoch1", "mvtec-epoch1"]
    assert [get_method("crane").protocol_train_on(d) for d in ("mvtec", "headct")] == ["visa", "mvtec"]


def test_eval_tells_the_method_its_dataset(files, synthetic_root, tmp_path):
    from zsadcli.core.evaluation import evaluate_dataset

    method = build("crane+", files, size=56)
    meta = load_meta(synthetic_root)
    small = {"train": {}, "test": {"disc": meta["test"]["disc"][:2] + meta["test"]["disc"][-2:]}}
    result = evaluate_dataset(method, "dagm", synthetic_root, small)
    assert method.soft_mean and set(result.per_class) == {"disc"}


@pytest.mark.parametrize("name,switch", [("crane", "no-eattn"), ("crane", "no-sbp"), ("crane+", "soft-mean-on"),
                                         ("crane+", "soft-mean-off"), ("crane", "no-smoothing"),
                                         ("crane+", "no-dattn"), ("crane+", "no-eattn"), ("crane+", "no-sbp")])
def test_ablation_switches_change_the_output(files, name, switch):
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    hp = {"soft_mean": switch == "soft-mean-off"} if switch.startswith("soft-mean") else {}
    with torch.no_grad():
        base = build(name, files, size=56, hparams=hp)(images)
        other = build(name, files, size=56, ablate=[switch], hparams=hp)(images)
    if switch == "no-sbp":  # the image score only
        assert torch.equal(base.anomaly_map, other.anomaly_map)
        assert not torch.allclose(base.image_score, other.image_score, atol=1e-6)
    else:
        assert not torch.allclose(base.anomaly_map, other.anomaly_map, atol=1e-6)
    if switch in ("soft-mean-on", "soft-mean-off", "no-smoothing"):
        assert torch.equal(base.image_score, other.image_score)


def test_aliased_layers_equal_layer_24_alone(files):
    """The official in-place aliasing: Crane's "6 12 18 24" score like layer 24 alone."""
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        four = build("crane", files, size=56)(images)
        one = build("crane", files, size=56, hparams={"layers": [24]})(images)
        distinct = build("crane", files, size=56, hparams={"alias_layers": False})(images)
    assert torch.allclose(four.anomaly_map, one.anomaly_map, atol=1e-6)
    assert torch.allclose(four.image_score, one.image_score, atol=1e-6)
    assert not torch.allclose(four.anomaly_map, distinct.anomaly_map, atol=1e-4)


def test_bad_settings_are_bad_input(files):
    with pytest.raises(BadInput, match="exclude"):
        build("crane", files, ablate=["soft-mean-on", "soft-mean-off"])
    with pytest.raises(BadInput, match="dattn_mean"):
        build("crane+", files, hparams={"dattn_mean": "gpu"})
    with pytest.raises(BadInput, match="no ablation switch"):
        build("crane", files, ablate=["no-dattn"])
    with pytest.raises(BadInput, match="no hyperparameter"):
        build("crane", files, hparams={"dino_file": "x"})


# ------------------------------------------------------------------ checkpoints
def test_our_format_round_trips_and_holds_only_the_prompts(tmp_path, files):
    method = build("crane+", files, size=56)
    state = method.checkpoint_state()
    assert all(k.startswith("prompts.") for k in state) and sum(v.numel() for k, v in state.items()
                                                              if "ctx" in k or "compound" in k) == 2 * 12 * 64 + 8 * 4 * 64
    path = save_checkpoint(tmp_path / "ours.safetensors", state, method="crane+", backbone="tiny-clip",
                           trained_on="synthetic", hparams=method.hparams, epoch=5)
    again = build_method(MethodSpec("crane+", backbone="tiny-clip", checkpoint=str(path), image_size=56)).method
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a, b = method(images), again(images)
    assert torch.equal(a.image_score, b.image_score) and torch.equal(a.anomaly_map, b.anomaly_map)
    with pytest.raises(BadInput, match="belongs to method"):
        build_method(MethodSpec("crane", backbone="tiny-clip", checkpoint=str(path), image_size=56))


def test_anomalyclip_files_are_not_crane_checkpoints(tmp_path, files):
    from test_anomalyclip import authors_checkpoint

    path = tmp_path / "ac.pth"
    torch.save(authors_checkpoint(), path)
    with pytest.raises(BadInput, match="does not hold crane weights"):
        build_method(MethodSpec("crane", backbone="tiny-clip", checkpoint=str(path), image_size=56))


def test_static_text_is_computed_once(files, monkeypatch):
    method = build("crane", files, size=56)
    calls = []
    original = method.backbone.encode_text_embeddings
    monkeypatch.setattr(method.backbone, "encode_text_embeddings", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        for _ in range(3):
            method(torch.randn(1, 3, 56, 56))
    assert len(calls) == 1


@pytest.fixture(scope="module")
def text768_backbone(tmp_path_factory):
    """Tiny vision, but the text tower the released prompts need: width 768 and 9 blocks (the
    deep prompts go before blocks 2-9). Random fp16 tensors, saved as safetensors."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = CLIP(64, CLIPVisionCfg(layers=24, width=128, patch_size=14, image_size=224),
                      CLIPTextCfg(context_length=77, vocab_size=49408, width=768, heads=12, layers=9),
                      quick_gelu=True).state_dict()
    gen = torch.Generator().manual_seed(7)
    state = {}
    for key, meta in shapes.items():
        if key.endswith("logit_scale"):
            value = torch.tensor(4.6)
        elif meta.ndim == 1 and ("ln" in key or "norm" in key) and key.endswith("weight"):
            value = 1 + 0.1 * torch.randn(meta.shape, generator=gen)
        else:
            fan = meta.shape[-1] if meta.ndim >= 2 else 50
            value = torch.randn(meta.shape, generator=gen) * fan ** -0.5
        state[key] = value.half()
    path = tmp_path_factory.mktemp("text768") / "clip_text768.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.skipif(not RELEASED.is_dir(), reason="../shared/weights/crane is not present")
def test_each_released_checkpoint_loads_and_predicts(text768_backbone, files, synthetic_root, tmp_path):
    from zsadcli.core.backbone import load_backbone
    from zsadcli.core.hub import load_registry

    registry = load_registry()
    backbone = load_backbone(text768_backbone, quick_gelu=True)
    images = images_of(synthetic_root, n=2, size=56)
    for relative, (name, trained_on) in RELEASED_FILES.items():
        path = RELEASED / relative
        if not path.is_file():
            pytest.skip(f"{path} is missing")
        entry = registry[get_method(name).released[trained_on]]
        from zsadcli.core.hub import verify

        assert verify(entry, path).ok  # weights.yaml pins exactly these bytes
        raw = load_checkpoint(path).raw
        cls = get_method(name)
        implied = cls.authors_checkpoint_hparams(raw)
        assert implied == {"n_ctx": 12, "deep_depth": 9, "deep_len": 4}
        hp = {"image_size": 56, **({"dino_file": str(files["dino"])} if name == "crane+" else {})}
        method = cls(backbone, {**implied, **hp})
        method.import_authors_checkpoint(raw)
        assert torch.equal(method.prompts.tokenized_prompts_neg, raw["prompt_learner"]["tokenized_prompts_neg"])
        with torch.no_grad():
            out = method.eval()(images)
        assert out.anomaly_map.shape == (2, 56, 56) and torch.isfinite(out.anomaly_map).all()
        assert ((out.image_score > 0) & (out.image_score < 1)).all()
    # and through the command line, as the outside checks run it
    result = CliRunner().invoke(app, [
        "predict", str(synthetic_root / "disc/test/stain/000.png"), "--method", "crane+", "--backbone-file",
        str(text768_backbone), "--checkpoint", str(RELEASED / "trained_on_mvtec_cranep/epoch_5.pth"), "--dino-file",
        str(files["dino"]), "--image-size", "56", "--device", "cpu", "--save-raw", str(tmp_path / "raw"), "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "raw" / "000.npy").is_file()


# ------------------------------------------------------------------ training
def _ctx_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny CLIP with embed dim = text width (64), which context-guided prompts need."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(64, CLIPVisionCfg(layers=24, width=128, patch_size=14, image_size=224),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=12), quick_gelu=True)
    reference = build_tiny_open_clip(seed)
    with torch.no_grad():  # reuse the tiny CLIP's randomised tensors where shapes agree
        ref = reference.state_dict()
        for key, value in model.state_dict().items():
            if key in ref and ref[key].shape == value.shape:
                value.copy_(ref[key])
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ctx_backbone_file(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ctxclip") / "ctx_clip.safetensors"
    save_file(_ctx_clip_state(), str(path))
    return path


@pytest.mark.parametrize("name", ["crane", "crane+"])
def test_training_loss_matches_the_official_computation(files, synthetic_root, name):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    state = _ctx_clip_state()
    backbone = backbone_from_state_dict(dict(state), quick_gelu=True, source="ctx")
    clip = CLIP(64, CLIPVisionCfg(layers=24, width=128, patch_size=14, image_size=224),
                CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=12), quick_gelu=True)
    clip.load_state_dict(state)
    pl = crane_checkpoint(clip=clip)
    hp = {"image_size": 56, **({"dino_file": str(files["dino"])} if name == "crane+" else {})}
    method = get_method(name)(backbone, hp)
    method.import_authors_checkpoint(pl)
    method.train()
    images = images_of(synthetic_root, n=3, size=56)
    masks = (torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(0)) > 0.8).float()
    labels = torch.tensor([0, 1, 1])
    out = method(images)
    loss, parts = method.loss(out, masks, labels)
    expected = crane_reference_loss(clip, pl["prompt_learner"], images, masks, labels,
                                    layers=(24,) if name == "crane+" else (6, 12, 18, 24),
                                    dino_state=tiny_dinov2_state_dict(seed=0, grid=16) if name == "crane+" else None)
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)
    loss.backward()
    assert method.prompts.ctx_pos.grad is not None and method.prompts.ctx_pos.grad.abs().sum() > 0
    assert set(parts) == {"focal", "dice", "image"}


def test_context_guidance_needs_embed_dim_equal_to_text_width(files, synthetic_root):
    method = build("crane", files, size=56)  # tiny-clip: embed 32, text width 64
    method.train()
    with pytest.raises(BadInput, match="text width"):
        method(images_of(synthetic_root, n=2, size=56))
    static = build("crane", files, size=56, hparams={"context_prob_train": 0.0})
    static.train()
    static(images_of(synthetic_root, n=2, size=56))  # static prompts in training: fine


@pytest.fixture(scope="module")
def strong_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crane-data")
    write_meta(root / "aux", generate_synthetic(root / "aux", seed=0, size=56, defect_scale=2.5, n_train=0,
                                                classes=("disc", "checker"), n_test_good=3, n_per_defect=2))
    return root


@pytest.mark.parametrize("name", ["crane", "crane+"])
def test_short_training_lowers_the_loss(strong_data, ctx_backbone_file, files, tmp_path, name):
    runs = tmp_path / "runs"
    extra = ["--dino-file", str(files["dino"])] if name == "crane+" else []
    result = CliRunner().invoke(app, ["train", "--method", name, "--on", "aux", "--data-root", str(strong_data),
                                      "--epochs", "3", "--name", "t", "--runs", str(runs), "--backbone-file",
                                      str(ctx_backbone_file), "--image-size", "56", "--device", "cpu", "--json",
                                      *extra])
    assert result.exit_code == 0, result.output
    history = json.loads(result.stdout)["history"]
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    checkpoint = runs / "train" / "t" / "epoch_3.safetensors"
    loaded = load_checkpoint(checkpoint)
    assert loaded.method == name and all(k.startswith("prompts.") for k in loaded.tensors)


def test_fully_masked_d_attn_rows_stay_finite(files):
    """beta * mean >= 1 masks whole rows (the official code gives NaN); ours keeps them finite."""
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = build("crane+", files, size=56, hparams={"dattn_beta": 50.0})(images)
    assert torch.isfinite(out.anomaly_map).all() and torch.isfinite(out.image_score).all()
