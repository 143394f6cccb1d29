"""BSR-CLIP on the tiny CLIP: parity with a plain re-statement of the official computation (with and
without the BSR chain, per stage), each stage against its definition, checkpoint formats (ours,
the plain-tensor layout, the authors' pickled pair), the training loss and its gradients, the CLI."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import reference_bsrclip as ref
from tinyclip import build_tiny_open_clip
from zsadcli.cli import app
from zsadcli.core.checkpoints import save_checkpoint
from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.core.methods.bsrclip import (aggregate_neighbours, attention_affinity, background_calibration,
                                          gaussian_kernel2d, patch_alignment, soft_gated_refinement)
from zsadcli.data.images import clip_preprocess, open_image
from zsadcli.errors import BadInput

SIZE = 224  # a 16 x 16 patch grid: the smallest sizes fail SRR's reflect padding, as officially
TINY = ["--backbone", "tiny-clip", "--image-size", str(SIZE), "--device", "cpu"]


def plain_checkpoint(seed: int = 3, vision_width: int = 128, text_width: int = 64) -> dict:
    """The plain-tensor layout, with weights that give the tiny model varied maps."""
    gen = torch.Generator().manual_seed(seed)
    adaptor = {
        "attention.norm.weight": 1 + 0.1 * torch.randn(vision_width, generator=gen),
        "attention.norm.bias": 0.1 * torch.randn(vision_width, generator=gen),
        "attention.attn.to_q.weight": 0.5 * torch.randn(512, vision_width, generator=gen),
        "attention.attn.to_k.weight": 0.5 * torch.randn(512, vision_width, generator=gen),
        "attention.attn.to_v.weight": 0.05 * torch.randn(512, vision_width, generator=gen),
        "attention.attn.to_out.0.weight": 0.05 * torch.randn(vision_width, 512, generator=gen),
        "attention.attn.to_out.0.bias": 0.05 * torch.randn(vision_width, generator=gen),
    }
    return {"prompt": {"state_prompt_embedding": 1.5 * torch.randn(1, 12, text_width, generator=gen)},
            "adaptor": adaptor}


@pytest.fixture(scope="module")
def plain_file(tmp_path_factory, tiny_registry):
    path = tmp_path_factory.mktemp("bsr") / "bsr_plain.pt"
    torch.save(plain_checkpoint(), path)
    return path


@pytest.fixture(scope="module")
def clip():
    return build_tiny_open_clip(seed=0)


@pytest.fixture(scope="module")
def images(synthetic_root):
    paths = ["disc/test/stain/000.png", "checker/test/good/001.png", "stripes/test/scratch/002.png"]
    return torch.stack([clip_preprocess(open_image(synthetic_root / p), SIZE) for p in paths])


def build(checkpoint, ablate=(), size=SIZE, **kwargs):
    spec = MethodSpec("bsrclip", backbone="tiny-clip", checkpoint=str(checkpoint), image_size=size,
                      ablate=frozenset(ablate), **kwargs)
    return build_method(spec).method


def run(method, images):
    with torch.no_grad():
        return method(images)


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("setting", ["full", "no-bsr", "no-rcs", "no-calibration+no-srr"])
def test_matches_the_official_computation(plain_file, clip, images, setting):
    ablate = () if setting in ("full", "no-bsr") else tuple(setting.split("+"))
    method = build(plain_file, ablate=ablate, hparams={"bsr": False} if setting == "no-bsr" else {})
    out = run(method, images)
    flags = {"calib": "no-calibration" not in ablate, "rcs": "no-rcs" not in ablate, "srr": "no-srr" not in ablate}
    if setting == "no-bsr":
        flags = dict(calib=False, rcs=False, srr=False)
    scores, maps = ref.bsrclip_reference(clip, plain_checkpoint(), images, **flags)
    assert out.anomaly_map.shape == (3, SIZE, SIZE)
    assert np.abs(out.anomaly_map.numpy() - maps).max() <= 1e-4
    assert (out.image_score - scores).abs().max() <= 1e-5
    assert maps.max() - maps.min() > 0.01  # a map with structure, not a constant


def test_each_stage_changes_the_map_but_not_the_score(plain_file, images):
    full = run(build(plain_file), images)
    for ablate in ("no-calibration", "no-rcs", "no-srr"):
        out = run(build(plain_file, ablate=(ablate,)), images)
        assert (out.anomaly_map - full.anomaly_map).abs().max() > 1e-3, ablate
        assert torch.equal(out.image_score, full.image_score)
    off = build(plain_file, hparams={"bsr": False})
    assert off.smoothing_sigma == 4.0 and build(plain_file).smoothing_sigma == 2.0
    # the official evaluation switches the smoothing on RCS/SRR only; calibration alone keeps sigma 4
    assert build(plain_file, ablate=("no-rcs", "no-srr")).smoothing_sigma == 4.0
    assert build(plain_file, ablate=("no-calibration", "no-srr")).smoothing_sigma == 2.0
    with pytest.raises(BadInput, match="no ablation switch"):
        build(plain_file, ablate=("no-such",))


def test_small_grids_are_refused_clearly_by_srr(plain_file):
    method = build_method(MethodSpec("bsrclip", backbone="tiny-clip", checkpoint=str(plain_file),
                                     image_size=112)).method  # 8 x 8 grid, blur radius 9
    with pytest.raises(BadInput, match="larger than 9") as refused:
        run(method, torch.randn(1, 3, 112, 112))
    assert "no-srr" in refused.value.hint
    out = run(build_method(MethodSpec("bsrclip", backbone="tiny-clip", checkpoint=str(plain_file), image_size=112,
                                      ablate=frozenset({"no-srr"}))).method, torch.randn(1, 3, 112, 112))
    assert out.anomaly_map.shape == (1, 112, 112)


# ---------------------------------------------------------------------- stages
def test_neighbour_aggregation_is_a_zero_padded_gaussian_window():
    kernel = gaussian_kernel2d(3, 4.0)
    assert torch.isclose(kernel.sum(), torch.tensor(1.0)) and kernel[1, 1] == kernel.max()
    tokens = torch.randn(2, 1 + 25, 7)
    out = aggregate_neighbours(tokens, 5, kernel)
    assert torch.equal(out[:, 0], tokens[:, 0])  # CLS untouched
    grid = tokens[:, 1:].reshape(2, 5, 5, 7)
    # corner patch: only the 2 x 2 in-grid part of its window contributes (no renormalisation)
    corner = sum(kernel[1 + dy, 1 + dx] * grid[:, dy, dx] for dy in (0, 1) for dx in (0, 1))
    torch.testing.assert_close(out[:, 1], corner)
    centre = sum(kernel[dy + 1, dx + 1] * grid[:, 2 + dy, 2 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    torch.testing.assert_close(out[:, 1 + 12], centre)
    assert torch.equal(aggregate_neighbours(tokens, 5, None), tokens)


def test_background_calibration_formula():
    probs = torch.full((1, 100), 0.1)
    probs[0, :5] = 0.9  # compact anomaly: max/mean = 0.9 / 0.14 = 6.43
    logits = torch.stack([torch.zeros(1, 100), torch.linspace(-1.0, 3.0, 100)[None]], dim=-1)
    out = background_calibration(logits, probs, beta0=0.52, bg_quantile=0.75, base_quantile=0.95)
    compact = 0.9 / 0.14
    beta = min(max(0.52 * (1.2 - 0.3 * min(max((compact - 3) / 7, 0), 1)), 0.45), 0.70)
    background = logits[0, 5:, 1]  # p <= q75 (= 0.1)
    base = max(float(torch.quantile(background, 0.95)), 0.0)
    expected = torch.sigmoid(logits[0, :, 1] - beta * base - logits[0, :, 0])
    torch.testing.assert_close(out[0], expected)
    # fewer than 16 background patches: the mean of all anomaly logits; a negative base counts as 0
    small = logits[:, :10].clone()
    small[..., 1] -= 5
    few = background_calibration(small, torch.rand(1, 10), beta0=0.52, bg_quantile=0.75, base_quantile=0.95)
    torch.testing.assert_close(few, torch.sigmoid(small[..., 1] - small[..., 0]))
    small[..., 1] += 10
    flat = torch.full((1, 10), 0.3)  # compactness 1 -> beta = 0.52 * 1.2
    few = background_calibration(small, flat, beta0=0.52, bg_quantile=0.75, base_quantile=0.95)
    torch.testing.assert_close(few, torch.sigmoid(small[..., 1] - 0.624 * small[..., 1].mean() - small[..., 0]))


def test_rcs_affinity_keeps_top_k_adds_identity_and_normalises():
    attn = torch.rand(1, 1 + 6, 1 + 6).softmax(-1)
    corr = attention_affinity([attn, attn.flip(-1)], topk=2, gamma=1.2)
    mean = (attn[:, 1:, 1:] + attn.flip(-1)[:, 1:, 1:]) / 2
    top = mean.topk(2, dim=-1)
    expected = torch.zeros_like(mean).scatter_(-1, top.indices, top.values) + torch.eye(6)
    expected = expected ** 1.2
    torch.testing.assert_close(corr, expected / (expected.sum(-1, keepdim=True) + 1e-6))
    assert ((corr > 0).sum(-1) <= 3).all()  # k entries plus the diagonal


def test_srr_gate_and_blur():
    maps = torch.zeros(1, 20, 20)
    maps[0, 10, 10] = 1.0  # one hot patch above the 98th percentile
    out = soft_gated_refinement(maps, sigma=3.0, gate_quantile=0.98, gate_temperature=0.08)
    # the gate is ~0 on the flat background: unchanged there; the peak is blurred (it spreads out)
    assert out[0, 0, 0] == 0 and 0 < out[0, 10, 10] < 1
    flat = soft_gated_refinement(torch.full((1, 20, 20), 1.7), sigma=3.0, gate_quantile=0.98,
                                 gate_temperature=0.08)
    torch.testing.assert_close(flat, torch.ones(1, 20, 20))  # clamped to 1; blur of a constant is itself


# ---------------------------------------------------------------------- checkpoints
def test_zsad_checkpoint_round_trip(tmp_path, plain_file, images):
    method = build(plain_file)
    state = method.checkpoint_state()
    assert set(state) == {"state_prompt_embedding", *(f"adaptor.{k}" for k in plain_checkpoint()["adaptor"])}
    assert sum(v.numel() for v in state.values()) == 12 * 64 + 2 * 128 + 3 * 512 * 128 + 512 * 128 + 128
    path = save_checkpoint(tmp_path / "bsr.safetensors", state, method="bsrclip", backbone="tiny-clip",
                           trained_on="synthetic", hparams=method.hparams)
    again = build(path)
    a, b = run(method, images[:1]), run(again, images[:1])
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.image_score, b.image_score)


def _authors_adaptor_module(state: dict) -> torch.nn.Module:
    """A whole Adaptor object as the authors pickle it: classes of a module named ``clip.adaptor``."""
    module = types.ModuleType("clip.adaptor")

    class CrossAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale, self.heads = 64 ** -0.5, 8
            self.to_q = torch.nn.Linear(128, 512, bias=False)
            self.to_k = torch.nn.Linear(128, 512, bias=False)
            self.to_v = torch.nn.Linear(128, 512, bias=False)
            self.to_out = torch.nn.Sequential(torch.nn.Linear(512, 128), torch.nn.Dropout(0.0))

    class BasicTransformerBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = CrossAttention()
            self.norm = torch.nn.LayerNorm(128)

    class Adaptor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = BasicTransformerBlock()

    for cls in (CrossAttention, BasicTransformerBlock, Adaptor):
        cls.__module__ = "clip.adaptor"
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)
    adaptor = Adaptor()
    adaptor.load_state_dict(state)
    return module, adaptor


def test_authors_pickled_pair_needs_allow_pickle(tmp_path, plain_file, monkeypatch):
    checkpoint = plain_checkpoint()
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(torch.nn.Parameter(checkpoint["prompt"]["state_prompt_embedding"]), folder / "mvtec_prompt.pt")
    module, adaptor = _authors_adaptor_module(checkpoint["adaptor"])
    monkeypatch.setitem(sys.modules, "clip", types.ModuleType("clip"))
    monkeypatch.setitem(sys.modules, "clip.adaptor", module)
    torch.save(adaptor, folder / "mvtec_adaptor.pt")
    monkeypatch.delitem(sys.modules, "clip.adaptor")  # as on a user's machine: no authors' code to import
    monkeypatch.delitem(sys.modules, "clip")
    runner = CliRunner()
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(image)
    base = ["predict", str(image), "--method", "bsrclip", "--backbone", "tiny-clip", "--image-size", "112",
            "--device", "cpu", "--no-bsr", "--json"]
    for given in ("mvtec_prompt.pt", "mvtec_adaptor.pt"):
        refused = runner.invoke(app, [*base, "--checkpoint", str(folder / given)])
        assert refused.exit_code == 2, refused.output
        assert "--allow-pickle" in refused.output and "allowlist" in refused.output
    expected = runner.invoke(app, [*base, "--checkpoint", str(plain_file)])
    for given in ("mvtec_prompt.pt", "mvtec_adaptor.pt"):
        loaded = runner.invoke(app, [*base, "--checkpoint", str(folder / given), "--allow-pickle"])
        assert loaded.exit_code == 0, loaded.output
        assert json.loads(loaded.stdout)["image_score"] == json.loads(expected.stdout)["image_score"]
    (folder / "mvtec_adaptor.pt").unlink()
    missing = runner.invoke(app, [*base, "--checkpoint", str(folder / "mvtec_prompt.pt"), "--allow-pickle"])
    assert missing.exit_code == 2 and "mvtec_adaptor.pt" in missing.output


def test_checkpoint_shape_mismatch_is_a_clear_error(tmp_path):
    bad = plain_checkpoint(text_width=32)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(BadInput, match="another CLIP"):
        build(path)


# ---------------------------------------------------------------------- training
def test_training_loss_and_gradients_match_the_official_loss(plain_file, clip, synthetic_root):
    size = 112  # training runs no BSR stage: a small grid is fine
    images = torch.stack([clip_preprocess(open_image(synthetic_root / p), size) for p in
                          ("disc/test/stain/000.png", "checker/test/good/001.png", "stripes/test/scratch/002.png")])
    # image 0 all normal (its varied patches pull the same-label mean down), image 1 left out of the
    # alignment pairs (every patch samples one set and one clear pixel column: gt exactly 0.5),
    # image 2 half anomalous: the alignment hinge is active
    masks = torch.zeros(3, size, size, dtype=torch.bool)
    masks[1, :, 6::14] = True
    masks[2, :size // 2] = True
    labels = torch.tensor([1, 0, 1])
    method = build(plain_file, size=size)
    method.train()
    out = method(images)
    loss, parts = method.loss(out, masks, labels)
    loss.backward()
    assert parts["align"] > 0
    checkpoint = plain_checkpoint()
    leaves = [checkpoint["prompt"]["state_prompt_embedding"], *checkpoint["adaptor"].values()]
    for t in leaves:
        t.requires_grad_(True)
    expected = ref.training_loss(clip, checkpoint, images, masks, labels)
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    ours = dict(method.named_parameters())
    pairs = [("state_prompt_embedding", checkpoint["prompt"]["state_prompt_embedding"])]
    pairs += [(f"adaptor.{k}", v) for k, v in checkpoint["adaptor"].items()]
    for name, theirs in pairs:
        grad = ours[name].grad
        torch.testing.assert_close(grad, theirs.grad, rtol=1e-3, atol=1e-3 * float(theirs.grad.abs().max()))
    # the official in-place ground-truth rewrite matters: without it the gradients differ
    plain = build(plain_file, size=size, hparams={"official_gt_aliasing": False})
    plain.train()
    loss2, _ = plain.loss(plain(images), masks, labels)
    loss2.backward()
    assert torch.isclose(loss2, loss)
    diff = (plain.adaptor.attention.attn.to_v.weight.grad - ours["adaptor.attention.attn.to_v.weight"].grad).abs()
    assert diff.max() > 1e-2 * ours["adaptor.attention.attn.to_v.weight"].grad.abs().max()


def test_patch_alignment_edge_cases():
    tokens = [torch.randn(2, 1 + 4, 8)]
    assert float(patch_alignment(tokens, torch.ones(2, 4))) == 0  # no normal patch
    assert float(patch_alignment(tokens, torch.zeros(2, 4))) == 0  # no anomalous patch: no cross pairs
    half = torch.tensor([[0.5, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    t = F.normalize(tokens[0][:, 1:], dim=-1)
    sim = t @ t.transpose(1, 2)
    cross = torch.stack([sim[0, 1, 3], sim[0, 2, 3], sim[0, 3, 1], sim[0, 3, 2]]).mean()
    same = torch.cat([sim[0, 1:3, 1:3].flatten(), sim[0, 3:, 3:].flatten(), sim[1].flatten()]).mean()
    torch.testing.assert_close(patch_alignment(tokens, half), torch.clamp(cross - same, min=0))


def test_train_command_runs_the_recipe(tmp_path, synthetic_root):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--method", "bsrclip", "--on", synthetic_root.name, "--data-root",
                                 str(synthetic_root.parent), "--epochs", "1", "--batch-size", "8", "--name", "t",
                                 "--runs", str(tmp_path / "runs"), *TINY[:2], "--image-size", "112",
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    history = json.loads(result.stdout)["history"]
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    config = json.loads((tmp_path / "runs" / "train" / "t" / "config.json").read_text())
    assert config["seed"] == 122 and config["betas"] == [0.5, 0.999]


# ---------------------------------------------------------------------- CLI
def test_predict_cli_with_and_without_bsr(tmp_path, plain_file, synthetic_root, clip):
    runner = CliRunner()
    image = synthetic_root / "disc/test/stain/000.png"
    outputs = {}
    for name, flags in (("bsr", []), ("plain", ["--no-bsr"])):
        result = runner.invoke(app, ["predict", str(image), "--method", "bsrclip", "--checkpoint", str(plain_file),
                                     *TINY, "--save-raw", str(tmp_path / name), "--json", *flags])
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        saved = np.load(tmp_path / name / "000.npy")
        assert saved.dtype == np.float32 and saved.shape == (SIZE, SIZE)
        assert abs(record["map_max"] - float(saved.max())) <= 1e-6
        outputs[name] = (record["image_score"], saved)
    assert outputs["bsr"][0] == outputs["plain"][0]  # no stage changes the image score
    assert np.abs(outputs["bsr"][1] - outputs["plain"][1]).max() > 1e-3
    x = clip_preprocess(open_image(image), SIZE)[None]
    _, maps = ref.bsrclip_reference(clip, plain_checkpoint(), x, calib=False, rcs=False, srr=False)
    assert np.abs(outputs["plain"][1] - maps[0]).max() <= 1e-4
