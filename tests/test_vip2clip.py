"""ViP²-CLIP on a tiny CLIP with the official 768-wide text tower: parity with a plain
re-statement of the official computation (inference and training loss), the normal-prompt
quirk, checkpoint formats, ablations, batching, training through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from open_clip.tokenizer import tokenize
from typer.testing import CliRunner

from reference_vip2clip import vip2clip_reference, vip2clip_train_loss_reference
from tinyclip768 import save_tiny768
from zsadcli.cli import app
from zsadcli.core.checkpoints import load_checkpoint, save_checkpoint
from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.data.images import clip_preprocess, open_image
from zsadcli.data.meta import load_meta
from zsadcli.errors import BadInput

SIZE = 140  # 10 x 10 patches: more than the 50 the top-k takes


@pytest.fixture(scope="module")
def tiny768(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny768") / "tiny768.safetensors"
    return path, save_tiny768(path)


def authors_checkpoint(sd, seed: int = 1, n_ctx: int = 7, n_cls: int = 3, perturb_buffers: bool = False) -> dict:
    """A checkpoint in kim0806/ViP2-CLIP's layout (the normal prompt's buffers taken from the
    anomalous tokenisation, as its ICA builds them), with trained-looking random values."""
    gen = torch.Generator().manual_seed(seed)
    emb = sd["token_embedding.weight"]
    width, embed = emb.shape[1], sd["text_projection"].shape[1]
    ids = {s: tokenize([" ".join(["X"] * n_ctx) + f" {w} " + " ".join(["X"] * n_cls)])
           for s, w in (("pos", "good"), ("neg", "damaged"))}
    pl = {"cls_ctx": 0.3 * torch.randn(n_cls, width, generator=gen),
          "ctx_pos": 0.3 * torch.randn(n_ctx, width, generator=gen),
          "ctx_neg": 0.3 * torch.randn(n_ctx, width, generator=gen),
          "cls_prompter.bias": 0.3 * torch.randn(1, embed, generator=gen)}
    for i in range(n_cls):
        pl[f"cls_prompter.fc.{i}.0.weight"] = torch.randn(384, embed, generator=gen) / embed ** 0.5
        pl[f"cls_prompter.fc.{i}.0.bias"] = 0.1 * torch.randn(384, generator=gen)
        pl[f"cls_prompter.fc.{i}.2.weight"] = torch.randn(width, 384, generator=gen) / 384 ** 0.5
        pl[f"cls_prompter.fc.{i}.2.bias"] = 0.1 * torch.randn(width, generator=gen)
    for s in ("pos", "neg"):
        e = emb[ids["neg"]]  # the official quirk: both states embed the anomalous token ids
        pl[f"token_prefix_{s}"] = e[:, :1].clone()
        pl[f"token_middle_{s}"] = e[:, 1 + n_ctx:2 + n_ctx].clone()
        pl[f"token_suffix_{s}"] = e[:, 2 + n_ctx + n_cls:].clone()
        if perturb_buffers:
            pl[f"token_middle_{s}"] += 0.5 * torch.randn(pl[f"token_middle_{s}"].shape, generator=gen)
            pl[f"token_suffix_{s}"] += 0.5 * torch.randn(pl[f"token_suffix_{s}"].shape, generator=gen)
        pl[f"tokenized_prompts_{s}"] = ids[s].int()
    z = {}
    for name in ("q_proj_pre", "k_proj_pre_1", "v_proj_pre_1", "proj_post_t"):
        # queries/keys large (unscaled logits of a few units: peaked attention); values and
        # output near identity, so the refined text lies near the attended patches
        noise = torch.randn(embed, embed, generator=gen) / embed ** 0.5
        weight = torch.eye(embed) + noise if name in ("v_proj_pre_1", "proj_post_t") else 8.0 * noise
        z[f"{name}.weight"] = weight[..., None]
        z[f"{name}.bias"] = 0.02 * torch.randn(embed, generator=gen)
    z["prompt_temp_l1"] = torch.tensor(2.6593)
    return {"prompt_learner": pl, "Zero_try": z}


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory, tiny768):
    path = tmp_path_factory.mktemp("vip") / "mvtec_train_epoch_10.pth"
    torch.save(authors_checkpoint(tiny768[1]), path)
    return path


def build(tiny768, checkpoint=None, size: int = SIZE, ablate=(), hparams=None, **kwargs):
    spec = MethodSpec("vip2clip", backbone_file=str(tiny768[0]), checkpoint=str(checkpoint) if checkpoint else None,
                      image_size=size, ablate=frozenset(ablate), hparams=dict(hparams or {}),
                      require_weights=checkpoint is not None, **kwargs)
    return build_method(spec).method


@pytest.fixture(scope="module")
def images(synthetic_root):
    items = load_meta(synthetic_root)["test"]["disc"][2:5]
    return torch.stack([clip_preprocess(open_image(synthetic_root / it.img_path), SIZE) for it in items])


def test_matches_the_official_computation(tiny768, authors_file, images):
    method = build(tiny768, authors_file)
    with torch.no_grad():
        out = method(images)
    ref_scores, ref_maps = vip2clip_reference(tiny768[1], authors_checkpoint(tiny768[1]), images)
    assert out.anomaly_map.shape == (3, SIZE, SIZE) and out.image_score.shape == (3,)
    assert np.abs(out.anomaly_map.numpy() - ref_maps).max() <= 1e-4
    assert (out.image_score - ref_scores).abs().max() <= 1e-5
    assert ref_scores.std() > 1e-3 and ref_maps.std() > 1e-3  # a test that can fail


def test_batch_runs_the_text_tower_once_on_2b_sequences(tiny768, authors_file, images, monkeypatch):
    method = build(tiny768, authors_file)
    with torch.no_grad():
        single = [method(images[i:i + 1]) for i in range(3)]
        calls = []
        original = method.backbone.encode_text_embeddings
        monkeypatch.setattr(method.backbone, "encode_text_embeddings",
                            lambda emb, *a, **k: calls.append(emb.shape) or original(emb, *a, **k))
        batched = method(images)
    assert calls == [torch.Size([6, 77, 768])]
    assert torch.allclose(batched.image_score, torch.cat([o.image_score for o in single]), atol=1e-6)
    assert torch.allclose(batched.anomaly_map, torch.cat([o.anomaly_map for o in single]), atol=1e-5)


def test_checkpoint_buffers_define_the_prompts(tmp_path, tiny768, images):
    checkpoint = authors_checkpoint(tiny768[1], perturb_buffers=True)
    torch.save(checkpoint, tmp_path / "perturbed.pth")
    with torch.no_grad():
        out = build(tiny768, tmp_path / "perturbed.pth")(images[:2])
    ref_scores, ref_maps = vip2clip_reference(tiny768[1], checkpoint, images[:2])
    assert (out.image_score - ref_scores).abs().max() <= 1e-5
    assert np.abs(out.anomaly_map.numpy() - ref_maps).max() <= 1e-4


def test_buffers_built_from_text_reproduce_the_normal_prompt_quirk(tiny768, authors_file):
    """Rebuilt from text, the normal prompt's state slot holds "damaged" (as the released
    files do); --fix-normal-prompt puts "good" there, also over an authors' checkpoint."""
    emb = tiny768[1]["token_embedding.weight"]
    good, damaged = emb[tokenize(["good"])[0, 1]], emb[tokenize(["damaged"])[0, 1]]
    fresh = build(tiny768)
    assert torch.equal(fresh.ica.token_middle_pos[0, 0], damaged)
    assert torch.equal(fresh.ica.token_middle_neg[0, 0], damaged)
    stored = authors_checkpoint(tiny768[1])["prompt_learner"]
    for key in ("token_prefix_pos", "token_middle_pos", "token_suffix_pos", "tokenized_prompts_pos",
                "token_suffix_neg", "tokenized_prompts_neg"):
        assert torch.equal(getattr(fresh.ica, key), stored[key]), key
    for how in ({"hparams": {"fix_normal_prompt": True}}, {"ablate": ["fix-normal-prompt"]}):
        assert torch.equal(build(tiny768, **how).ica.token_middle_pos[0, 0], good)
        fixed = build(tiny768, authors_file, **how)
        assert torch.equal(fixed.ica.token_middle_pos[0, 0], good)
        assert torch.equal(fixed.ica.token_middle_neg[0, 0], damaged)
        assert fixed.hparams["fix_normal_prompt"] is True


def test_fix_normal_prompt_equals_the_reference_with_good(tiny768, authors_file, images):
    checkpoint = authors_checkpoint(tiny768[1])
    checkpoint["prompt_learner"]["token_middle_pos"] = tiny768[1]["token_embedding.weight"][
        tokenize(["good"])[0, 1]].reshape(1, 1, -1).clone()
    with torch.no_grad():
        out = build(tiny768, authors_file, hparams={"fix_normal_prompt": True})(images[:2])
        base = build(tiny768, authors_file)(images[:2])
    ref_scores, ref_maps = vip2clip_reference(tiny768[1], checkpoint, images[:2])
    assert (out.image_score - ref_scores).abs().max() <= 1e-5
    assert np.abs(out.anomaly_map.numpy() - ref_maps).max() <= 1e-4
    assert (out.image_score - base.image_score).abs().max() > 1e-6


@pytest.mark.parametrize("hparams,ref_kwargs", [({"topk": 7}, {"topk": 7}),
                                                ({"layers": [12, 24]}, {"features_list": (12, 24)}),
                                                ({"sigma": 0}, {"sigma": 0})])
def test_topk_layer_set_and_sigma_follow_the_reference(tiny768, authors_file, images, hparams, ref_kwargs):
    with torch.no_grad():
        out = build(tiny768, authors_file, hparams=hparams)(images[:2])
    ref_scores, ref_maps = vip2clip_reference(tiny768[1], authors_checkpoint(tiny768[1]), images[:2], **ref_kwargs)
    assert (out.image_score - ref_scores).abs().max() <= 1e-5
    assert np.abs(out.anomaly_map.numpy() - ref_maps).max() <= 1e-4


def test_no_fgp_scores_with_the_plain_text_embeddings(tiny768, authors_file, images):
    with torch.no_grad():
        out = build(tiny768, authors_file, ablate=["no-fgp"])(images[:2])
    ref_scores, ref_maps = vip2clip_reference(tiny768[1], authors_checkpoint(tiny768[1]), images[:2], use_fgp=False)
    assert (out.image_score - ref_scores).abs().max() <= 1e-5
    assert np.abs(out.anomaly_map.numpy() - ref_maps).max() <= 1e-4


@pytest.mark.parametrize("switch", ["no-image-tokens", "no-fgp", "fix-normal-prompt", "last-layer", "no-smoothing"])
def test_ablation_switches_change_the_output(tiny768, authors_file, images, switch):
    with torch.no_grad():
        base = build(tiny768, authors_file)(images[:2])
        other = build(tiny768, authors_file, ablate=[switch])(images[:2])
    assert not torch.allclose(base.anomaly_map, other.anomaly_map, atol=1e-6)
    if switch != "no-smoothing":
        assert not torch.allclose(base.image_score, other.image_score, atol=1e-7)
    else:
        assert torch.equal(base.image_score, other.image_score)


def test_static_prompts_without_image_tokens_are_computed_once(tiny768, authors_file, monkeypatch):
    method = build(tiny768, authors_file, size=56, ablate=["no-image-tokens"])
    calls = []
    original = method.backbone.encode_text_embeddings
    monkeypatch.setattr(method.backbone, "encode_text_embeddings",
                        lambda emb, *a, **k: calls.append(emb.shape[0]) or original(emb, *a, **k))
    with torch.no_grad():
        outs = [method(torch.randn(b, 3, 56, 56)) for b in (1, 2, 3)]
    assert calls == [2] and [o.image_score.shape[0] for o in outs] == [1, 2, 3]


def test_our_format_round_trips_exactly(tmp_path, tiny768, authors_file, images):
    method = build(tiny768, authors_file, hparams={"topk": 20})
    path = save_checkpoint(tmp_path / "ours.safetensors", method.checkpoint_state(), method="vip2clip",
                           backbone="tiny768", trained_on="synthetic", hparams=method.hparams, epoch=10)
    loaded = load_checkpoint(path)
    assert loaded.kind == "zsad" and loaded.hparams["topk"] == 20 and loaded.hparams["n_ctx"] == 7
    assert any(k.startswith("ica.token_middle_pos") for k in loaded.tensors)
    again = build(tiny768, path)
    with torch.no_grad():
        a, b = method(images[:2]), again(images[:2])
    assert torch.equal(a.image_score, b.image_score) and torch.equal(a.anomaly_map, b.anomaly_map)


def test_authors_checkpoint_hparams_and_bad_files(tmp_path, tiny768):
    checkpoint = authors_checkpoint(tiny768[1], n_ctx=9)
    torch.save(checkpoint, tmp_path / "nine.pth")
    assert build(tiny768, tmp_path / "nine.pth").hparams["n_ctx"] == 9  # read from the file's shapes
    checkpoint["Zero_try"]["q_proj_pre.weight"] = torch.zeros(64, 768, 1)
    torch.save(checkpoint, tmp_path / "bad.pth")
    with pytest.raises(BadInput, match="shape"):
        build(tiny768, tmp_path / "bad.pth")
    del checkpoint["Zero_try"]["prompt_temp_l1"]
    checkpoint["Zero_try"]["q_proj_pre.weight"] = torch.zeros(768, 768, 1)
    torch.save(checkpoint, tmp_path / "missing.pth")
    with pytest.raises(BadInput, match="keys"):
        build(tiny768, tmp_path / "missing.pth")
    with pytest.raises(BadInput, match="no ablation switch"):
        build(tiny768, tmp_path / "nine.pth", ablate=["no-dpam"])


def test_loss_equals_the_official_training_objective(tiny768, authors_file, images):
    method = build(tiny768, authors_file).train()
    gt = torch.zeros(3, SIZE, SIZE)
    gt[1, 30:70, 40:90] = 1
    gt[2, 100:120, 10:50] = 1
    labels = torch.tensor([0, 1, 1])
    out = method(images)
    loss, parts = method.loss(out, gt.bool(), labels)
    ref = vip2clip_train_loss_reference(tiny768[1], authors_checkpoint(tiny768[1]), images, gt, labels)
    assert abs(float(loss) - float(ref)) <= 1e-4 * max(1.0, abs(float(ref)))
    assert set(parts) == {"map", "image"}
    loss.backward()
    grads = {n: p.grad for n, p in method.named_parameters() if p.requires_grad}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads
               if n != "fgp.prompt_temp_l1"), [n for n, g in grads.items() if g is None]
    assert grads["fgp.prompt_temp_l1"] is None  # unused in the official forward too
    assert not any(p.requires_grad for p in method.backbone.parameters())


def test_optimizer_has_the_two_learning_rates(tiny768, authors_file):
    method = build(tiny768, authors_file)
    optimizer = method.make_optimizer()
    ica, fgp = optimizer.param_groups
    assert ica["lr"] == 1e-3 and fgp["lr"] == pytest.approx(1e-5) and ica["betas"] == (0.9, 0.999)
    assert sum(p.numel() for p in ica["params"]) == 3 * 768 + 2 * 7 * 768 + 768 + 3 * (768 * 384 + 384 + 384 * 768 + 768)
    assert sum(p.numel() for p in fgp["params"]) == 4 * (768 * 768 + 768) + 1
    assert [g["lr"] for g in method.make_optimizer(2e-3).param_groups] == [2e-3, pytest.approx(2e-5)]


# ------------------------------------------------------------------ command line
def test_predict_cli_with_backbone_file_and_authors_checkpoint(tiny768, authors_file, synthetic_root, tmp_path):
    paths = [synthetic_root / f"disc/test/{d}/00{i}.png" for d, i in (("good", 0), ("stain", 1))]
    result = CliRunner().invoke(app, ["predict", *map(str, paths), "--method", "vip2clip", "--backbone-file",
                                      str(tiny768[0]), "--checkpoint", str(authors_file), "--image-size", str(SIZE),
                                      "--device", "cpu", "--save-raw", str(tmp_path / "raw"), "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    images = torch.stack([clip_preprocess(open_image(p), SIZE) for p in paths])
    ref_scores, ref_maps = vip2clip_reference(tiny768[1], authors_checkpoint(tiny768[1]), images)
    for record, score, amap in zip(records, ref_scores, ref_maps):
        saved = np.load(tmp_path / "raw" / (record["path"].rsplit("/", 1)[1][:-4] + ".npy"))
        assert saved.shape == (SIZE, SIZE) and np.abs(saved - amap).max() <= 1e-4
        assert abs(record["image_score"] - float(score)) <= 1e-5
        assert record["map_max"] == pytest.approx(float(saved.max()), rel=1e-6)


def test_train_two_epochs_and_eval_on_the_small_clip(tmp_path):
    """Training through the engine on the standard tiny CLIP (text width 64, embed 32): the
    method follows the backbone's sizes; the loss falls and eval reads the checkpoint."""
    from zsadcli.data.meta import write_meta
    from zsadcli.data.synthetic import generate_synthetic

    data_root = tmp_path / "data"
    write_meta(data_root / "aux", generate_synthetic(data_root / "aux", seed=0, classes=("disc", "checker"), size=64,
                                                     n_train=0, n_test_good=3, n_per_defect=2, defect_scale=2.5))
    runner = CliRunner()
    runs = tmp_path / "runs"
    common = ["--backbone", "tiny-clip", "--image-size", "112", "--device", "cpu"]
    result = runner.invoke(app, ["train", "--method", "vip2clip", "--on", "aux", "--data-root", str(data_root),
                                 "--epochs", "2", "--name", "v", "--runs", str(runs), *common,
                                 "--hparam", "mlp_hidden=16", "--ablate", "fix-normal-prompt", "--json"])
    assert result.exit_code == 0, result.output
    history = json.loads(result.stdout)["history"]
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]
    checkpoint = runs / "train" / "v" / "epoch_2.safetensors"
    loaded = load_checkpoint(checkpoint)
    assert loaded.hparams["fix_normal_prompt"] is True and loaded.hparams["mlp_hidden"] == 16
    evaluated = runner.invoke(app, ["eval", "--method", "vip2clip", "--test-on", "aux", "--data-root", str(data_root),
                                    "--checkpoint", str(checkpoint), *common, "--runs", str(runs), "--name", "e",
                                    "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)["datasets"][0]
    assert set(report["per_class"]) == {"disc", "checker"}


def test_bf16_is_close_to_fp32(tiny768, authors_file, images):
    with torch.no_grad():
        exact = build(tiny768, authors_file)(images[:1])
        fast = build(tiny768, authors_file, dtype=torch.bfloat16)(images[:1])
    assert (exact.image_score - fast.image_score).abs().max() < 0.05
    assert (exact.anomaly_map - fast.anomaly_map).abs().max() < 0.05


def test_released_checkpoints_are_registered():
    from zsadcli.core import hub

    registry = hub.load_registry()
    for trained_on, blob in (("mvtec", "2988d3d425552fde7ed8c33433dea402c43103c5"),
                             ("visa", "5d95c734a7a4b52b41704d322f4c046b8c1fcbcf")):
        entry = registry[f"vip2clip-trained-on-{trained_on}"]
        assert entry.git_blob == blob and entry.extra["method"] == "vip2clip" and entry.format == "authors"
        assert entry.url.endswith(f"/models/{trained_on}_train_epoch_10.pth")
