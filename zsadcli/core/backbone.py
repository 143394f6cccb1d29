"""CLIP backbone on open_clip: building it from the registry, a local file or a hub id, and the
feature taps every ZSAD method needs.

open_clip holds the weights and runs the frozen blocks; this module adds what open_clip does
not expose: any input size (position grid interpolated by the caller's mode), the raw residual
stream after any set of blocks, a dual-path hook (``core.attention``), and a text tower that
takes token embeddings (learnable context) and per-layer deep prompts. With no prompts the text
tower is open_clip's ``encode_text`` operation for operation.
"""
from __future__ import annotations

import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zsadcli.core.attention import DualPath, dual_block, split_qkv
from zsadcli.errors import BadInput

# TorchScript archives from OpenAI carry these non-tensor entries; loaders drop them.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_REQUIRED_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                  "token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")


@dataclass(frozen=True)
class ClipArch:
    """A CLIP ViT's dimensions, read from its tensors."""

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {k[len(prefix):].split(".", 1)[0] for k in state_dict if k.startswith(prefix)}
    return len(ids)


def infer_arch(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> ClipArch:
    """Architecture from tensor shapes (OpenAI and open_clip share key names).

    Heads are width // 64, as in every CLIP ViT OpenAI and open_clip released.
    """
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise BadInput(f"{source} is not a CLIP ViT state dict (OpenAI/open_clip key names): "
                       f"missing {', '.join(missing[:3])}.",
                       hint="pass the OpenAI .pt archive, an open_clip .bin/.safetensors, or a registry key")
    patch = state_dict["visual.conv1.weight"].shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_width = state_dict["visual.conv1.weight"].shape[0]
    text_width = state_dict["ln_final.weight"].shape[0]
    return ClipArch(
        embed_dim=state_dict["text_projection"].shape[1],
        image_size=patch * grid,
        patch_size=patch,
        vision_width=vision_width,
        vision_layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        vision_heads=max(1, vision_width // 64),
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_heads=max(1, text_width // 64),
        text_layers=_count_blocks(state_dict, "transformer.resblocks."),
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a CLIP checkpoint file, fp32 on the CPU.

    Accepts safetensors, a plain (weights-only) torch pickle, or an OpenAI TorchScript archive.
    Pickles that need code to unpickle are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"backbone file {path} does not exist.", hint="check the path given to --backbone-file")
    if path.stat().st_size == 0:
        raise BadInput(f"backbone file {path} is empty.", hint="download it again")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
        if path.suffix == ".safetensors" or (head[8:9] == b"{" and not head.startswith(b"PK")):
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif _is_torchscript(path):
            with warnings.catch_warnings():  # torch>=2.9 flags jit as deprecated; the OpenAI file is one
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"backbone file {path} cannot be read as safetensors, a weights-only torch "
                       f"checkpoint or a TorchScript archive ({type(exc).__name__}: {str(exc)[:200]}).",
                       hint="zsad refuses pickles that need code; convert the file to safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BadInput(f"backbone file {path} holds a {type(state).__name__}, not a state dict.")
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        # the causal mask is rebuilt, never loaded (scripted open_clip models serialise it)
        if key in _OPENAI_EXTRA_KEYS or key.endswith("attn_mask") or not isinstance(value, torch.Tensor):
            continue
        out[key] = value.float() if value.is_floating_point() else value
    return out


def build_clip(state_dict: dict[str, torch.Tensor], *, quick_gelu: bool, source: str = "state dict"):
    """An open_clip ``CLIP`` holding ``state_dict`` (strict), frozen and in eval mode."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    arch = infer_arch(state_dict, source)
    vision = CLIPVisionCfg(layers=arch.vision_layers, width=arch.vision_width,
                           head_width=arch.vision_width // arch.vision_heads,
                           patch_size=arch.patch_size, image_size=arch.image_size)
    text = CLIPTextCfg(context_length=arch.context_length, vocab_size=arch.vocab_size,
                       width=arch.text_width, heads=arch.text_heads, layers=arch.text_layers)
    # Build on the meta device and adopt the tensors: no time spent on a random init.
    with torch.device("meta"):
        model = CLIP(arch.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise BadInput(f"{source} does not fit a CLIP ViT built from its own shapes: {str(exc)[:300]}") from None
    causal = torch.full((arch.context_length, arch.context_length), float("-inf")).triu_(1)
    model.register_buffer("attn_mask", causal, persistent=False)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise BadInput(f"{source} lacks tensors the model needs: {', '.join(leftover[:3])}.")
    model.eval().requires_grad_(False)
    return model, arch


@dataclass
class ImageFeatures:
    """Raw residual-stream tokens (B, 1 + N, C), CLS first, by 1-based block index; with
    ``attn_probs`` requested, the head-averaged attention probabilities (B, 1 + N, 1 + N) of
    those blocks (rows: queries)."""

    tokens: torch.Tensor
    taps: dict[int, torch.Tensor] = field(default_factory=dict)
    alt_taps: dict[int, torch.Tensor] = field(default_factory=dict)
    grid: int = 0
    attn_probs: dict[int, torch.Tensor] = field(default_factory=dict)


class ClipBackbone(nn.Module):
    """A frozen CLIP ViT with the taps ZSAD methods read."""

    def __init__(self, clip: nn.Module, arch: ClipArch, *, quick_gelu: bool, source: str) -> None:
        super().__init__()
        self.clip = clip
        self.arch = arch
        self.quick_gelu = quick_gelu
        self.source = source
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        if not getattr(clip.visual.transformer, "batch_first", True):
            raise BadInput("this open_clip build runs sequence-first transformers; zsad needs open_clip >= 2.21")
        self.eval()

    def train(self, mode: bool = True) -> "ClipBackbone":
        """The backbone is frozen: it stays in eval mode when a method trains its own parts."""
        return super().train(False)

    # ------------------------------------------------------------------ vision
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def vision_layers(self) -> int:
        return self.arch.vision_layers

    def grid_for(self, image_size: int) -> int:
        if image_size % self.arch.patch_size:
            raise BadInput(f"image size {image_size} is not a multiple of the patch size {self.arch.patch_size}.")
        return image_size // self.arch.patch_size

    def positional_embedding(self, grid: int, mode: str = "bilinear") -> torch.Tensor:
        """(1 + grid^2, C) position embedding; the patch grid resized with ``mode``
        (align_corners False, no antialias; ``"<mode>+antialias"`` antialiases, as open_clip's
        ``resize_pos_embed`` does), the CLS position untouched. Cached per grid."""
        pos = self.visual.positional_embedding
        from zsadcli.core.graph import capturing

        if capturing():  # a graph takes the grid computed before capture as a constant
            for (c_grid, c_mode, c_dtype, c_device, _), cached in self._pos_cache.items():
                if (c_grid, c_mode, c_dtype, c_device) == (grid, mode, pos.dtype, pos.device):
                    return cached
        key = (grid, mode, pos.dtype, pos.device, pos.data_ptr())
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        native = self.arch.grid
        if grid == native:
            out = pos
        else:
            patches = pos[1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
            base, _, flag = mode.partition("+")
            extra = {} if base == "nearest" else {"align_corners": False}
            if flag == "antialias":  # (the antialiased kernels run in fp32 only on the CPU)
                extra["antialias"] = True
                patches = F.interpolate(patches.float(), size=(grid, grid), mode=base, **extra).to(pos.dtype)
            else:
                patches = F.interpolate(patches, size=(grid, grid), mode=base, **extra)
            out = torch.cat([pos[:1], patches.reshape(1, pos.shape[-1], grid * grid)[0].T], dim=0)
        self._pos_cache = {key: out}
        return out

    def embed_image(self, images: torch.Tensor, pos_mode: str = "bilinear") -> tuple[torch.Tensor, int]:
        """Patch embedding + CLS + positions, before ``ln_pre``: (B, 1 + N, C)."""
        visual = self.visual
        x = visual.conv1(images.to(self.dtype))
        grid = x.shape[-1]
        if x.shape[-2] != grid:
            raise BadInput(f"non-square input {tuple(images.shape[-2:])}; zsad resizes to a square first")
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + self.positional_embedding(grid, pos_mode).to(x.dtype), grid

    def forward_image(self, images: torch.Tensor, taps: Iterable[int] = (), *,
                      dual: DualPath | None = None, pos_mode: str = "bilinear",
                      stop_after: int | None = None, attn_probs: Iterable[int] = (),
                      prompts: Sequence[torch.Tensor] = ()) -> ImageFeatures:
        """Run the image tower. ``taps`` are 1-based block indices whose output (raw residual
        stream, before ``ln_post``) is returned; with ``dual`` the alternate stream is tapped too.
        ``attn_probs``: blocks whose head-averaged softmax(QK^T) of the original stream is returned
        (computed beside the block, which itself runs unchanged).

        ``prompts`` (deep visual prompts, AdaCLIP/VPT style): ``prompts[0]`` (B, n, C) is appended
        after all tokens (after ``ln_pre``, no position embedding) before block 1, and
        ``prompts[i]`` replaces those last n tokens before block i + 1; later blocks carry them
        along. The n prompt tokens are stripped from every tap and from ``tokens``."""
        taps = set(taps)
        attn_probs = set(attn_probs)
        bad = [t for t in taps | attn_probs if not 1 <= t <= self.vision_layers]
        if bad:
            raise BadInput(f"layer(s) {sorted(bad)} do not exist: this backbone has {self.vision_layers} blocks.")
        prompts = list(prompts)
        if prompts and (dual is not None or attn_probs):
            raise BadInput("visual prompts do not combine with a dual path or attention taps.")
        n_prompt = prompts[0].shape[1] if prompts else 0
        x, grid = self.embed_image(images, pos_mode)
        x = self.visual.ln_pre(x)
        features = ImageFeatures(tokens=x, grid=grid)
        alt = None
        last = stop_after or self.vision_layers
        for index, block in enumerate(self.visual.transformer.resblocks[:last], start=1):
            if index <= len(prompts):
                kept = x if index == 1 else x[:, :x.shape[1] - n_prompt]
                x = torch.cat([kept, prompts[index - 1].to(x.dtype)], dim=1)
            if index in attn_probs:
                features.attn_probs[index] = self.attention_probs(block, x)
            if dual is not None and index >= dual.start:
                x, alt = dual_block(block, x, alt, dual)
            else:
                x = block(x)
            if index in taps:
                features.taps[index] = x[:, :x.shape[1] - n_prompt] if n_prompt else x
                if alt is not None:
                    features.alt_taps[index] = alt
        features.tokens = x[:, :x.shape[1] - n_prompt] if n_prompt else x
        return features

    @staticmethod
    def attention_probs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim)) of ``block`` on its input ``x``, averaged over heads:
        (B, L, L). The order of operations follows torch's ``need_weights=True`` path
        (q scaled first, then q k^T), which is what code that asks nn.MultiheadAttention for its
        weights gets."""
        q, k, _ = split_qkv(block, block.ln_1(x))
        batch, heads, tokens, head_dim = q.shape
        q = q.reshape(batch * heads, tokens, head_dim) * math.sqrt(1.0 / head_dim)
        k = k.reshape(batch * heads, tokens, head_dim)
        probs = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
        return probs.view(batch, heads, tokens, tokens).mean(dim=1)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``proj`` on any tapped tokens: (..., C) -> (..., embed_dim)."""
        return self.visual.ln_post(tokens) @ self.visual.proj

    def global_feature(self, tokens: torch.Tensor, *, ln_post: bool = True) -> torch.Tensor:
        """The CLS token projected, with or without ``ln_post`` (methods differ)."""
        cls = tokens[:, 0]
        return (self.visual.ln_post(cls) if ln_post else cls) @ self.visual.proj

    def encode_image(self, images: torch.Tensor, pos_mode: str = "bilinear") -> torch.Tensor:
        return self.global_feature(self.forward_image(images, pos_mode=pos_mode).tokens)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        from open_clip.tokenizer import tokenize

        return tokenize(list(texts), context_length=self.arch.context_length).to(self.device)

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.token_embedding(token_ids).to(self.dtype)

    def encode_text_embeddings(self, embeddings: torch.Tensor, eot_index: torch.Tensor,
                               deep_prompts: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Text features from token embeddings (B, L, W).

        ``deep_prompts[i]`` (n, W) overwrites sequence positions 1..n before text block i + 2
        (1-based), i.e. before blocks 2..len+1: the MaPLe/AnomalyCLIP insertion rule. A
        (B, n, W) prompt gives each sequence its own tokens (image-conditioned prompts).
        Sequences may be cut after their last EOT (L < context length): with the causal mask the
        pooled EOT features do not depend on the positions after it.
        """
        length = embeddings.shape[1]
        x = embeddings.to(self.dtype) + self.clip.positional_embedding[:length].to(self.dtype)
        mask = self.clip.attn_mask[:length, :length].to(x.dtype)
        deep = list(deep_prompts or [])
        for index, block in enumerate(self.clip.transformer.resblocks):
            if 1 <= index <= len(deep):
                prompt = deep[index - 1].to(x.dtype)
                n = prompt.shape[-2]
                x = torch.cat([x[:, :1], prompt.expand(x.shape[0], n, -1), x[:, 1 + n:]], dim=1)
            x = block(x, attn_mask=mask)
        x = self.clip.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return pooled @ self.clip.text_projection

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Identical to open_clip's ``encode_text`` (unnormalised)."""
        return self.encode_text_embeddings(self.token_embedding(token_ids), token_ids.argmax(dim=-1))


def check_input_size(size: int, patch: int, source: str) -> None:
    """An input side the backbone can take: a positive multiple of its patch size, at most MAX_IMAGE_SIZE."""
    from zsadcli.core.limits import MAX_IMAGE_SIZE

    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_IMAGE_SIZE or size % patch:
        high = MAX_IMAGE_SIZE - MAX_IMAGE_SIZE % patch
        nearest = max(patch, min(high, round(size / patch) * patch)) if isinstance(size, int) else 16 * patch
        raise BadInput(f"image size {size!r} does not fit the backbone {source}: it takes a multiple of its patch "
                       f"size {patch} from {patch} to {high}.", hint=f"e.g. --image-size {nearest}")


def _safetensors_patch_size(path: Path) -> int | None:
    """The patch size from a safetensors header (no tensor is read), or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
        if head[8:9] != b"{":
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            if "visual.conv1.weight" not in handle.keys():
                return None
            return int(handle.get_slice("visual.conv1.weight").get_shape()[-1])
    except Exception:  # unreadable here: the full load reports it properly
        return None


def peek_patch_size(spec: str | os.PathLike) -> int | None:
    """The backbone's patch size without loading its weights, where a header tells it: a local
    safetensors file, or a registry entry whose cached file (or converted copy) is safetensors.
    None where only a full read can tell (torch pickles, TorchScript, hub ids, files not cached)."""
    from zsadcli.core import hub

    spec_str = str(spec)
    if spec_str.startswith("hf-hub:"):
        return None
    try:
        registry = hub.load_registry()
    except Exception:
        return None
    if spec_str in registry:
        entry = registry[spec_str]
        candidates = [_converted_cache(entry.sha256)] if entry.sha256 else []
        cached = hub.cached_path(entry)
        if cached is not None:
            candidates.append(Path(cached))
        for path in candidates:
            if path.is_file():
                patch = _safetensors_patch_size(path)
                if patch:
                    return patch
        return None
    path = Path(spec_str).expanduser()
    return _safetensors_patch_size(path) if path.is_file() else None


def backbone_from_state_dict(state_dict: dict[str, torch.Tensor], *, quick_gelu: bool,
                             source: str) -> ClipBackbone:
    clip, arch = build_clip(state_dict, quick_gelu=quick_gelu, source=source)
    return ClipBackbone(clip, arch, quick_gelu=quick_gelu, source=source)


def _converted_cache(sha256: str) -> Path:
    from zsadcli.core.hub import zsad_cache_dir

    return zsad_cache_dir() / "converted" / f"{sha256}.safetensors"


def load_backbone(spec: str | os.PathLike, *, quick_gelu: bool) -> ClipBackbone:
    """Build from (a) a weights.yaml key, (b) a local file, or (c) ``hf-hub:org/name[@rev]``.

    Activation (QuickGELU vs GELU) is the caller's: it belongs to the method being reproduced.
    """
    from zsadcli.core import hub

    spec_str = str(spec)
    if spec_str.startswith("hf-hub:"):
        path = _download_hub_id(spec_str[len("hf-hub:"):])
        return backbone_from_state_dict(read_state_dict(path), quick_gelu=quick_gelu, source=spec_str)
    registry = hub.load_registry()
    if spec_str in registry:
        entry = hub.resolve(registry[spec_str])  # verified path
        digest = registry[spec_str].sha256
        if registry[spec_str].format == "openai-torchscript" and digest:
            # Unpacking the TorchScript archive is slow; keep a verified-by-origin safetensors copy.
            converted = _converted_cache(digest)
            if converted.is_file():
                state = read_state_dict(converted)
            else:
                state = read_state_dict(entry)
                _save_safetensors_atomic(state, converted)
        else:
            state = read_state_dict(entry)
        return backbone_from_state_dict(state, quick_gelu=quick_gelu, source=f"{spec_str} ({entry})")
    path = Path(spec_str).expanduser()
    if not path.exists():
        raise BadInput(f"backbone {spec_str!r} is neither a registry key, an hf-hub: id nor an existing file.",
                       hint=f"registry keys: {', '.join(k for k, e in registry.items() if e.section == 'backbones')}")
    return backbone_from_state_dict(read_state_dict(path), quick_gelu=quick_gelu, source=str(path))


def _save_safetensors_atomic(state: dict[str, torch.Tensor], target: Path) -> None:
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, target)


def _download_hub_id(hub_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    from zsadcli.core.hub import hf_cache_dir, is_offline
    from zsadcli.errors import WeightsUnavailable

    repo_id, _, revision = hub_id.partition("@")
    errors = []
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision or None,
                                        cache_dir=str(hf_cache_dir()), local_files_only=is_offline()))
        except Exception as exc:  # try the next file name, report all at the end
            errors.append(f"{filename}: {type(exc).__name__}")
    raise WeightsUnavailable(f"hub id {hub_id!r} gave no open_clip weights ({'; '.join(errors)}).",
                             hint=f"on a machine with internet run: hf download {repo_id} open_clip_model.safetensors")
