"""The CLIP backbone: loading paths, open_clip parity, position interpolation, taps,
the v-v dual path and the prompted text tower, each against an independent computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zsadcli.core.attention import DualPath
from zsadcli.core.backbone import infer_arch, load_backbone, read_state_dict
from zsadcli.errors import BadInput
from tinyclip import build_tiny_open_clip, tiny_state_dict


@pytest.fixture(scope="module")
def reference():
    return build_tiny_open_clip(seed=0)


@pytest.fixture(scope="module")
def backbone(tiny_registry):
    return load_backbone("tiny-clip", quick_gelu=True)


def test_registry_backbone_equals_open_clip(backbone, reference):
    images = torch.randn(2, 3, 224, 224)
    ids = backbone.tokenize(["a photo of a damaged object.", "object."])
    with torch.no_grad():
        assert torch.equal(backbone.encode_image(images), reference.encode_image(images))
        assert torch.equal(backbone.encode_text(ids), reference.encode_text(ids))
    assert backbone.arch.vision_layers == 24 and backbone.arch.text_layers == 12
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.training


@pytest.mark.parametrize("fmt", ["openai-pt", "torchscript", "safetensors"])
def test_backbone_file_formats_give_the_same_model(tmp_path, reference, fmt):
    state = tiny_state_dict(seed=0)
    path = tmp_path / f"weights.{fmt}"
    if fmt == "openai-pt":
        # the OpenAI layout: fp16 tensors plus the three bookkeeping entries loaders drop
        half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
        half.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                    vocab_size=torch.tensor(49408))
        torch.save(half, path)
        expected = build_tiny_open_clip(seed=0)
        expected.load_state_dict({k: v.half().float() for k, v in state.items()})
    elif fmt == "torchscript":
        torch.jit.script(build_tiny_open_clip(seed=0)).save(str(path))
        expected = reference
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
        expected = reference
    model = load_backbone(path, quick_gelu=True)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), expected.requires_grad_(False).encode_image(images))


def test_architecture_is_inferred_from_shapes():
    arch = infer_arch(tiny_state_dict())
    assert (arch.vision_width, arch.vision_heads, arch.patch_size, arch.image_size) == (128, 2, 14, 224)
    assert (arch.text_width, arch.text_heads, arch.embed_dim, arch.context_length) == (64, 1, 32, 77)


def test_activation_follows_the_caller(tmp_path):
    from open_clip.transformer import QuickGELU

    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(tiny_state_dict(), str(path))
    quick = load_backbone(path, quick_gelu=True).visual.transformer.resblocks[0].mlp.gelu
    plain = load_backbone(path, quick_gelu=False).visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(quick, QuickGELU) and isinstance(plain, torch.nn.GELU)


def test_bad_files_are_refused_clearly(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    not_clip = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, not_clip)
    for path in (tmp_path / "missing.pt", empty, junk):
        with pytest.raises(BadInput, match=path.name):
            read_state_dict(path)
    with pytest.raises(BadInput, match="not a CLIP ViT state dict"):
        load_backbone(not_clip, quick_gelu=True)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_position_grid_interpolation(backbone, mode):
    pos = backbone.visual.positional_embedding
    grid = backbone.grid_for(112)
    got = backbone.positional_embedding(grid, mode)
    patches = pos[1:].reshape(16, 16, -1).permute(2, 0, 1)[None]
    expected = F.interpolate(patches, size=(grid, grid), mode=mode, align_corners=False)[0]
    assert torch.equal(got[0], pos[0])
    assert torch.allclose(got[1:], expected.permute(1, 2, 0).reshape(grid * grid, -1))
    other = backbone.positional_embedding(grid, "bicubic" if mode == "bilinear" else "bilinear")
    assert not torch.allclose(got, other)


def test_taps_are_the_residual_stream(backbone):
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        features = backbone.forward_image(images, taps=[1, 12, 24])
        x, _ = backbone.embed_image(images)
        x = backbone.visual.ln_pre(x)
        stream = {}
        for index, block in enumerate(backbone.visual.transformer.resblocks, start=1):
            x = block(x)
            stream[index] = x
    assert features.grid == 8 and features.taps[1].shape == (2, 65, 128)
    for layer in (1, 12, 24):
        assert torch.allclose(features.taps[layer], stream[layer], atol=1e-6)
    projected = backbone.project(features.taps[24])
    assert torch.allclose(projected, backbone.visual.ln_post(stream[24]) @ backbone.visual.proj, atol=1e-6)
    cls_plain = backbone.global_feature(features.tokens, ln_post=False)
    assert torch.allclose(cls_plain, stream[24][:, 0] @ backbone.visual.proj, atol=1e-6)
    with pytest.raises(BadInput):
        backbone.forward_image(images, taps=[25])


def _naive_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, written out plainly."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = ((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, c)


def test_vv_dual_path_matches_the_dpam_definition(backbone):
    """Original path untouched; from block 6: x_vv = x5 + VV(LN1(x5)), then x_vv += VV(LN1(x_ori))."""
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        features = backbone.forward_image(images, taps=[6, 24], dual=DualPath(start=6))
        plain = backbone.forward_image(images, taps=[24])
        x, _ = backbone.embed_image(images)
        x = backbone.visual.ln_pre(x)
        vv = None
        for index, block in enumerate(backbone.visual.transformer.resblocks, start=1):
            if index >= 6:
                h = block.ln_1(x)
                qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
                v = qkv.chunk(3, dim=-1)[2]
                out = block.attn.out_proj(_naive_attention(v, v, v, block.attn.num_heads))
                vv = (x if vv is None else vv) + out
            x = block(x)
            if index == 6:
                vv6 = vv.clone()
    assert torch.allclose(features.alt_taps[6], vv6, atol=1e-5)
    assert torch.allclose(features.alt_taps[24], vv, atol=1e-5)
    assert torch.allclose(features.taps[24], plain.taps[24], atol=1e-5)
    assert not torch.allclose(features.alt_taps[24], features.taps[24], atol=1e-3)


def test_text_tower_deep_prompts_overwrite_positions(backbone):
    ids = backbone.tokenize(["x x x x x x x x x x x x damaged object."])
    embeddings = backbone.token_embedding(ids)
    deep = [torch.randn(4, 64) for _ in range(8)]
    with torch.no_grad():
        got = backbone.encode_text_embeddings(embeddings, ids.argmax(-1), deep)
        x = embeddings + backbone.clip.positional_embedding
        for index, block in enumerate(backbone.clip.transformer.resblocks):
            if 1 <= index <= 8:
                x = x.clone()
                x[:, 1:5] = deep[index - 1]
            x = block(x, attn_mask=backbone.clip.attn_mask)
        expected = backbone.clip.ln_final(x)[0, ids.argmax(-1)[0]] @ backbone.clip.text_projection
        without = backbone.encode_text_embeddings(embeddings, ids.argmax(-1))
    assert torch.allclose(got[0], expected, atol=1e-6)
    assert torch.equal(without, backbone.encode_text(ids))
    assert not torch.allclose(got, without, atol=1e-4)


def test_registry_torchscript_entry_is_converted_once(tmp_path, monkeypatch, reference):
    """The OpenAI archive path: verified download -> safetensors copy keyed by its sha256."""
    import os
    from pathlib import Path

    import yaml

    from tinyclip import install_in_hf_cache, sha256_of

    archive = tmp_path / "ViT-tiny.pt"
    torch.jit.script(build_tiny_open_clip(seed=0)).save(str(archive))
    install_in_hf_cache(Path(os.environ["HF_HUB_CACHE"]), "zsad-test/tiny-ts", archive.name, "f" * 40, archive)
    registry = tmp_path / "reg.yaml"
    registry.write_text(yaml.safe_dump({"backbones": {"tiny-ts": {
        "source": "hf", "repo_id": "zsad-test/tiny-ts", "filename": archive.name, "revision": "f" * 40,
        "sha256": sha256_of(archive), "format": "openai-torchscript", "quick_gelu": True}}}))
    monkeypatch.setenv("ZSAD_REGISTRY", str(registry))
    monkeypatch.setenv("ZSAD_CACHE", str(tmp_path / "zsad"))
    first = load_backbone("tiny-ts", quick_gelu=True)
    converted = tmp_path / "zsad" / "converted" / f"{sha256_of(archive)}.safetensors"
    assert converted.is_file()
    second = load_backbone("tiny-ts", quick_gelu=True)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(first.encode_image(images), reference.encode_image(images))
        assert torch.equal(second.encode_image(images), reference.encode_image(images))


def test_hub_id_loads_offline_from_the_cache(reference):
    """(c) `hf-hub:org/name@rev`: the open_clip weight file found in the HF cache, offline."""
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    from tinyclip import install_in_hf_cache

    staging = Path(os.environ["HF_HUB_CACHE"]).parent / "hub-id-staging"
    staging.mkdir(exist_ok=True)
    payload = staging / "open_clip_model.safetensors"
    save_file(tiny_state_dict(seed=0), str(payload))
    install_in_hf_cache(Path(os.environ["HF_HUB_CACHE"]), "zsad-test/tiny-hub", payload.name, "e" * 40, payload)
    model = load_backbone(f"hf-hub:zsad-test/tiny-hub@{'e' * 40}", quick_gelu=True)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), reference.encode_image(images))
    from zsadcli.errors import WeightsUnavailable

    with pytest.raises(WeightsUnavailable):
        load_backbone("hf-hub:zsad-test/not-cached", quick_gelu=True)


def test_default_vit_l_sources_give_the_same_tensors(tmp_path, monkeypatch):
    """The three ViT-L/14@336 routes of weights.yaml, rebuilt at tiny scale offline: open_clip's Hub
    safetensors (fp32, the default), its .bin fallback, and OpenAI's fp16 TorchScript archive (the
    mirror and OpenAI's URL hold the same bytes). Same key mapping, same tensors, same model."""
    import os
    from pathlib import Path

    import yaml
    from safetensors.torch import save_file

    from zsadcli.core import hub
    from tinyclip import install_in_hf_cache, sha256_of

    packaged = hub._parse_registry(hub.PACKAGE_REGISTRY)
    fp16 = build_tiny_open_clip(seed=0).half()  # OpenAI ships fp16; open_clip's copy is those values in fp32
    state = {k: v.float() for k, v in fp16.state_dict().items() if k != "attn_mask"}
    staging = tmp_path / "staging"
    staging.mkdir()
    save_file(state, str(staging / "open_clip_model.safetensors"))
    torch.save(state, staging / "open_clip_pytorch_model.bin")
    torch.jit.script(fp16).save(str(staging / "ViT-L-14-336px.pt"))
    cache = Path(os.environ["HF_HUB_CACHE"])
    entries = {}
    for key in ("openai-vit-l-14-336", "openai-vit-l-14-336-bin", "openai-vit-l-14-336-mirror",
                "openai-vit-l-14-336-openai-url"):
        spec = dict(packaged[key].extra)  # fallback, quick_gelu, origin
        spec.update(source=packaged[key].source, format=packaged[key].format)
        payload = staging / (packaged[key].filename or "ViT-L-14-336px.pt")
        spec["sha256"] = sha256_of(payload)  # the tiny stand-in's digest in place of the real file's
        if packaged[key].source == "hf":
            repo = f"zsad-test/{packaged[key].repo_id.split('/')[1]}"
            spec.update(repo_id=repo, filename=packaged[key].filename, revision="d" * 40)
            if key != "openai-vit-l-14-336":  # the default is installed below, after its fallback is tried
                install_in_hf_cache(cache, repo, packaged[key].filename, "d" * 40, payload)
        else:
            spec.update(url=packaged[key].url, filename=packaged[key].filename)
            target = tmp_path / "zsad" / "url" / spec["sha256"][:16] / packaged[key].filename
            target.parent.mkdir(parents=True)
            target.write_bytes(payload.read_bytes())
        entries[key] = spec
    registry = tmp_path / "reg.yaml"
    registry.write_text(yaml.safe_dump({"backbones": entries}))
    monkeypatch.setenv("ZSAD_REGISTRY", str(registry))
    monkeypatch.setenv("ZSAD_CACHE", str(tmp_path / "zsad"))
    # offline without the safetensors: the default key falls back to the .bin (same tensors)
    assert hub.resolve(hub.get_entry("openai-vit-l-14-336")).name == "open_clip_pytorch_model.bin"
    install_in_hf_cache(cache, entries["openai-vit-l-14-336"]["repo_id"], "open_clip_model.safetensors", "d" * 40,
                        staging / "open_clip_model.safetensors")
    assert hub.resolve(hub.get_entry("openai-vit-l-14-336")).name == "open_clip_model.safetensors"
    default = load_backbone("openai-vit-l-14-336", quick_gelu=True)
    reference = default.clip.state_dict()
    for key in ("openai-vit-l-14-336-bin", "openai-vit-l-14-336-mirror", "openai-vit-l-14-336-openai-url"):
        own = load_backbone(key, quick_gelu=True).clip.state_dict()
        assert own.keys() == reference.keys(), key
        assert all(torch.equal(own[k], reference[k]) for k in own), key
    assert all(torch.equal(reference[k], v) for k, v in state.items())  # OpenAI's fp16 values, in fp32
