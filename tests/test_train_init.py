"""`zsad train --init PATH | --init-train-on DATASET`: training starts from given weights, the run
records where it started, resume keeps to it, and one optimiser step from the init equals a plain
re-statement of the recipe's step (AnomalyCLIP on the tiny CLIP, ViP²-CLIP on the 768-wide one)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import reference_anomalyclip as ref_ac
from reference_vip2clip import _official_dice, _official_focal, vip2clip_train_loss_reference
from test_anomalyclip import authors_checkpoint as anomalyclip_authors
from test_vip2clip import authors_checkpoint as vip2clip_authors
from tinyclip import build_tiny_open_clip
from tinyclip768 import save_tiny768
from zsadcli.cli import app
from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.data.images import clip_preprocess, load_mask, open_image
from zsadcli.data.meta import load_meta, resolve_item_path, write_meta
from zsadcli.data.synthetic import generate_synthetic

SIZE = 56  # 4 x 4 patches of the tiny CLIP: cheap
TINY = ["--backbone", "tiny-clip", "--image-size", str(SIZE), "--device", "cpu"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Five images of one class (two normal, three with masks): one batch of the recipe."""
    root = tmp_path_factory.mktemp("init-data")
    write_meta(root / "aux", generate_synthetic(root / "aux", seed=3, classes=("disc",), size=64, n_train=0,
                                                n_test_good=2, n_per_defect=1, defect_scale=2.5))
    return root


@pytest.fixture(scope="module")
def ac_init(tmp_path_factory, tiny_registry) -> Path:
    path = tmp_path_factory.mktemp("ac-init") / "epoch_15.pth"
    torch.save(anomalyclip_authors(seed=5), path)
    return path


def batch(root: Path, size: int, resample: str = "bilinear"):
    """Every item of the dataset in one batch, loaded as the training loader loads them."""
    items = load_meta(root)["test"]["disc"]
    images = torch.stack([clip_preprocess(open_image(resolve_item_path(root, it.img_path)), size) for it in items])
    masks = torch.stack([load_mask(resolve_item_path(root, it.mask_path) if it.anomaly and it.mask_path else None,
                                   size, resample) for it in items]).float()
    return images, masks, torch.tensor([it.anomaly for it in items])


def adam_first_step(params: dict[str, torch.Tensor], lrs: dict[str, float], betas, eps: float = 1e-8) -> dict:
    """Adam's first update written out: m = (1-b1) g, v = (1-b2) g^2, bias-corrected, p - lr m^ / (sqrt(v^) + eps)."""
    b1, b2 = betas
    out = {}
    for key, p in params.items():
        if p.grad is None:  # unused by the forward: Adam leaves it alone
            out[key] = p.detach().clone()
            continue
        m_hat = (1 - b1) * p.grad / (1 - b1)
        v_hat = (1 - b2) * p.grad ** 2 / (1 - b2)
        out[key] = (p - lrs[key] * m_hat / (v_hat.sqrt() + eps)).detach()
    return out


def leaves(state: dict, buffers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The authors' tensors as leaves; the learned ones (all but ``buffers``) require gradients."""
    return {k: v.detach().clone().requires_grad_(v.is_floating_point() and not k.startswith(buffers))
            for k, v in state.items()}


def assert_step_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                      start: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], eps: float = 1e-8) -> None:
    """Weights after the step to 1e-6 relative (to the tensor's largest value), widened only by what
    float noise in the gradient does to Adam's first step lr x g / (|g| + eps), namely
    lr x eps x noise / (|g| + eps)^2; noise = 1e-6 of |g| + 1e-6 of the tensor's largest gradient
    (a few float32 ulps: the two computations sum in different orders). That widening matters only
    for elements whose gradient is near that noise floor."""
    assert actual.keys() == expected.keys() == start.keys()
    for key in expected:
        lr = float((expected[key] - start[key]).abs().max())
        g = grads[key].double().abs()
        if float(g.max()) < 1e-6:
            # A gradient that is 0 in exact arithmetic (attention key biases: softmax ignores a shift
            # shared by a row) is pure float noise, and Adam's first step turns noise into +-lr.
            assert float((actual[key] - start[key]).abs().max()) <= lr * (1 + 1e-6), key
            continue
        scale = float(expected[key].abs().max())  # relative to the tensor: an update may cancel to ~0
        noise = 1e-6 * g + 1e-6 * float(g.max())
        allowed = 1e-6 * scale + lr * eps * noise / (g + eps) ** 2
        diff = (actual[key] - expected[key]).double().abs()
        assert bool((diff <= allowed).all()), (key, float(diff.max()), float((diff - allowed).max()))


def in_our_names(method: str, authors: dict, path: Path, **spec) -> dict[str, torch.Tensor]:
    """An authors'-layout dict as the method's own tensors (the import mapping under test elsewhere)."""
    torch.save(authors, path)
    return build_method(MethodSpec(method, checkpoint=str(path), **spec)).method.checkpoint_state()


def with_grads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learned tensors replaced by their gradients (0 where unused), buffers kept."""
    return {k: (v.grad if v.grad is not None else torch.zeros_like(v)) if v.requires_grad else v.detach()
            for k, v in state.items()}


# ------------------------------------------------------------------ lr 0, records, resume
def test_lr_zero_keeps_the_init_bit_for_bit_and_the_run_records_it(runner, tmp_path, data, ac_init):
    runs = tmp_path / "runs"
    common = ["train", "--method", "anomalyclip", "--on", "aux", "--data-root", str(data), "--runs", str(runs),
              "--name", "x", "--batch-size", "8", *TINY]
    result = runner.invoke(app, [*common, "--init", str(ac_init), "--epochs", "1", "--lr", "0"])
    assert result.exit_code == 0, result.output
    run = runs / "train" / "x"
    init = build_method(MethodSpec("anomalyclip", backbone="tiny-clip", checkpoint=str(ac_init),
                                   image_size=SIZE)).method.checkpoint_state()
    trained = load_file(run / "epoch_1.safetensors")
    assert trained.keys() == init.keys() and all(torch.equal(trained[k], init[k]) for k in init)
    record = {"source": str(ac_init), "path": str(ac_init), "sha256": sha256(ac_init)}
    assert json.loads((run / "config.json").read_text())["init"] == record
    with safe_open(str(run / "epoch_1.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["init"]) == record

    resumed = runner.invoke(app, [*common, "--resume", "--epochs", "2", "--lr", "0"])  # no --init needed
    assert resumed.exit_code == 0, resumed.output
    second = load_file(run / "epoch_2.safetensors")
    assert all(torch.equal(second[k], init[k]) for k in init)
    with safe_open(str(run / "epoch_2.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["init"]) == record

    other = tmp_path / "other.pth"
    torch.save(anomalyclip_authors(seed=6), other)
    refused = runner.invoke(app, [*common, "--resume", "--epochs", "3", "--lr", "0", "--init", str(other)])
    assert refused.exit_code == 2 and "started from" in refused.output, refused.output
    assert not (run / "epoch_3.safetensors").exists()


def test_training_free_methods_and_misfit_files_exit_2_before_training(runner, tmp_path, data, ac_init):
    runs = tmp_path / "runs"
    common = ["train", "--on", "aux", "--data-root", str(data), "--runs", str(runs), "--epochs", "1", *TINY]
    free = runner.invoke(app, [*common, "--method", "winclip", "--init", str(ac_init)])
    assert free.exit_code == 2 and "training-free" in free.output and "--init" in free.output
    both = runner.invoke(app, [*common, "--init", str(ac_init), "--init-train-on", "mvtec"])
    assert both.exit_code == 2 and "not both" in both.output
    missing = runner.invoke(app, [*common, "--init", str(tmp_path / "nope.pth")])
    assert missing.exit_code == 2 and "nope.pth" in missing.output

    wide = tmp_path / "wide.pth"  # the authors' layout for a CLIP with a 32-wide text tower
    torch.save(anomalyclip_authors(width=32), wide)
    shapes = runner.invoke(app, [*common, "--name", "w", "--init", str(wide)])
    assert shapes.exit_code == 2 and "shape" in shapes.output, shapes.output
    state = build_method(MethodSpec("anomalyclip", backbone="tiny-clip", checkpoint=str(ac_init),
                                    image_size=SIZE)).method.checkpoint_state()
    from zsadcli.core.checkpoints import save_checkpoint

    state["prompts.ctx_pos"] = torch.zeros(1, 1, 12, 32)  # our format, one tensor for another backbone
    save_checkpoint(tmp_path / "ours.safetensors", state, method="anomalyclip", backbone="tiny-clip",
                    trained_on="aux", hparams={"image_size": SIZE})
    ours = runner.invoke(app, [*common, "--name", "o", "--init", str(tmp_path / "ours.safetensors")])
    assert ours.exit_code == 2 and "ctx_pos" in ours.output and "(1, 1, 12, 32)" in ours.output, ours.output
    foreign = tmp_path / "vip.pth"
    torch.save({"prompt_learner": {"ctx_pos": torch.zeros(7, 64)}, "Zero_try": {}}, foreign)
    other = runner.invoke(app, [*common, "--name", "f", "--init", str(foreign)])
    assert other.exit_code == 2 and "anomalyclip" in other.output, other.output
    assert not any(runs.rglob("epoch_*.safetensors"))


# ------------------------------------------------------------------ one step = the recipe's step
@pytest.fixture()
def released_mvtec(tmp_path, monkeypatch, tiny_registry, ac_init):
    """--init-train-on mvtec, offline: the tiny authors' file registered (by sha256) and cached as the
    released AnomalyCLIP weights trained on MVTec."""
    import os

    from zsadcli.core import hub

    digest = sha256(ac_init)
    entry = {"description": "test stand-in", "source": "url", "url": "https://example.invalid/epoch_15.pth",
             "sha256": digest, "format": "authors", "method": "anomalyclip", "trained_on": "mvtec"}
    extra = tmp_path / "released.yaml"
    extra.write_text(yaml.safe_dump({"checkpoints": {"anomalyclip-trained-on-mvtec": entry}}))
    monkeypatch.setenv("ZSAD_REGISTRY", f"{tiny_registry['registry']}{os.pathsep}{extra}")
    cached = hub.cached_path(hub.get_entry("anomalyclip-trained-on-mvtec")) or hub._url_cache_path(
        hub.get_entry("anomalyclip-trained-on-mvtec"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(ac_init.read_bytes())
    return digest


def test_one_anomalyclip_step_from_released_weights_equals_the_recipe(runner, tmp_path, data, ac_init,
                                                                      released_mvtec):
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["train", "--method", "anomalyclip", "--on", "aux", "--data-root", str(data),
                                 "--runs", str(runs), "--name", "s", "--init-train-on", "mvtec", "--epochs", "1",
                                 "--batch-size", "8", *TINY, "--hparam", "fp16_deep_prompts=false", "--json"])
    assert result.exit_code == 0, result.output
    loss = json.loads(result.stdout)["history"][0]["loss"]
    config = json.loads((runs / "train" / "s" / "config.json").read_text())
    assert config["init"]["source"] == "released:anomalyclip-trained-on-mvtec"
    assert config["init"]["sha256"] == released_mvtec

    # The recipe re-stated: the official forward (reference module), CE + 4 x (focal + dice + dice),
    # Adam(lr 1e-3, betas (0.5, 0.999)) from the same authors' tensors, one batch. The deep prompts
    # stay fp32 on both sides: the official fp16 cast rounds their gradients to half precision, so an
    # element whose gradient is near 6e-8 is 0 on one side and not on the other by 1e-7-level float
    # noise, and Adam's first step (lr x sign) turns that into a full step of difference.
    clip = build_tiny_open_clip(seed=0)
    images, masks, labels = batch(data / "aux", SIZE)
    state = leaves(anomalyclip_authors(seed=5)["prompt_learner"], ("token_", "tokenized_", "compound_prompt_proj"))
    text = ref_ac.text_features(clip, state, fp16_deep=False)[0]  # (2, E)
    with torch.no_grad():
        g, patches = ref_ac.image_forward(clip, images)
    g = g / g.norm(dim=-1, keepdim=True)
    ref_loss = F.cross_entropy(g @ text.T / 0.07, labels)
    for p in patches:
        p = p / p.norm(dim=-1, keepdim=True)
        sim = (p @ text.T / 0.07).softmax(-1)[:, 1:]
        side = int(sim.shape[1] ** 0.5)
        prob = F.interpolate(sim.reshape(-1, side, side, 2).permute(0, 3, 1, 2), SIZE, mode="bilinear")
        ref_loss = ref_loss + 4 * (_official_focal(prob, masks) + _official_dice(prob[:, 1], masks)
                                   + _official_dice(prob[:, 0], 1 - masks))
    assert loss == pytest.approx(ref_loss.item(), rel=1e-6)
    ref_loss.backward()
    stepped = adam_first_step(state, {k: 1e-3 for k in state}, (0.5, 0.999))
    spec = {"backbone": "tiny-clip", "image_size": SIZE}
    assert_step_close(load_file(runs / "train" / "s" / "epoch_1.safetensors"),
                      in_our_names("anomalyclip", {"prompt_learner": stepped}, tmp_path / "stepped.pth", **spec),
                      in_our_names("anomalyclip", anomalyclip_authors(seed=5), tmp_path / "start.pth", **spec),
                      in_our_names("anomalyclip", {"prompt_learner": with_grads(state)}, tmp_path / "g.pth", **spec))


def test_one_vip2clip_step_from_an_authors_file_equals_the_recipe(runner, tmp_path, data):
    size = 140  # 10 x 10 patches: more than the 50 the top-k takes
    backbone = tmp_path / "tiny768.safetensors"
    sd = save_tiny768(backbone)
    init = tmp_path / "mvtec_train_epoch_10.pth"
    torch.save(vip2clip_authors(sd, seed=2), init)
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["train", "--method", "vip2clip", "--on", "aux", "--data-root", str(data),
                                 "--runs", str(runs), "--name", "v", "--init", str(init), "--epochs", "1",
                                 "--batch-size", "8", "--backbone-file", str(backbone), "--image-size", str(size),
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    loss = json.loads(result.stdout)["history"][0]["loss"]

    images, masks, labels = batch(data / "aux", size)
    authors = vip2clip_authors(sd, seed=2)
    checkpoint = {"prompt_learner": leaves(authors["prompt_learner"], ("token_", "tokenized_")),
                  "Zero_try": leaves(authors["Zero_try"], ())}
    ref_loss = vip2clip_train_loss_reference(sd, checkpoint, images, masks, labels)
    assert loss == pytest.approx(ref_loss.item(), rel=1e-6)
    ref_loss.backward()
    # the recipe: Adam(betas (0.9, 0.999)), ICA at 1e-3, FGP at 1e-3 x 0.01
    stepped = {"prompt_learner": adam_first_step(checkpoint["prompt_learner"],
                                                 {k: 1e-3 for k in checkpoint["prompt_learner"]}, (0.9, 0.999)),
               "Zero_try": adam_first_step(checkpoint["Zero_try"], {k: 1e-5 for k in checkpoint["Zero_try"]},
                                           (0.9, 0.999))}
    spec = {"backbone_file": str(backbone), "image_size": size}
    grads = {part: with_grads(tensors) for part, tensors in checkpoint.items()}
    assert_step_close(load_file(runs / "train" / "v" / "epoch_1.safetensors"),
                      in_our_names("vip2clip", stepped, tmp_path / "stepped.pth", **spec),
                      in_our_names("vip2clip", authors, tmp_path / "start.pth", **spec),
                      in_our_names("vip2clip", grads, tmp_path / "g.pth", **spec))
