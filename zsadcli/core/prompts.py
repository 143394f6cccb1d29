"""Prompt learners: learnable text context injected into the CLIP text tower.

``ObjectAgnosticPrompts`` is the AnomalyCLIP/Crane family: per state a template
``[n learnable] object.`` / ``[n learnable] damaged object.``, the learnable tokens replacing
positions 1..n of the tokenised template, plus deep prompts that overwrite positions 1..m
before text blocks 2..depth. State-dict keys equal the authors' (``ctx_pos``, ``ctx_neg``,
``compound_prompts_text.N``, ``token_prefix_*``, ``token_suffix_*``, ``tokenized_prompts_*``),
so their checkpoints load directly and their stored token buffers define the prompts
("buffers win").
"""
from __future__ import annotations

import torch
from torch import nn

from zsadcli.core.backbone import ClipBackbone

STATES = ("pos", "neg")  # normal, anomalous (the authors' names)


class ObjectAgnosticPrompts(nn.Module):
    def __init__(self, backbone: ClipBackbone, *, n_ctx: int = 12, deep_depth: int = 9, deep_len: int = 4,
                 templates: tuple[str, str] = ("object.", "damaged object."), init_std: float = 0.02) -> None:
        super().__init__()
        width = backbone.arch.text_width
        self.n_ctx = n_ctx
        # Same creation/initialisation order as the reference (pos, neg, then deep prompts).
        self.ctx_pos = nn.Parameter(torch.empty(1, 1, n_ctx, width))
        self.ctx_neg = nn.Parameter(torch.empty(1, 1, n_ctx, width))
        nn.init.normal_(self.ctx_pos, std=init_std)
        nn.init.normal_(self.ctx_neg, std=init_std)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(deep_len, width)) for _ in range(max(0, deep_depth - 1))])
        for prompt in self.compound_prompts_text:
            nn.init.normal_(prompt, std=init_std)
        placeholder = " ".join(["X"] * n_ctx)
        with torch.no_grad():
            for state, template in zip(STATES, templates):
                ids = backbone.tokenize([f"{placeholder} {template}"]).cpu()
                embedding = backbone.token_embedding(ids.to(backbone.device)).float().cpu()
                self.register_buffer(f"token_prefix_{state}", embedding[None, :, :1].clone())
                self.register_buffer(f"token_suffix_{state}", embedding[None, :, 1 + n_ctx:].clone())
                self.register_buffer(f"tokenized_prompts_{state}", ids[None].int())

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(embeddings (2, L, W) normal-then-anomalous, token ids (2, L), deep prompts)."""
        embeddings = torch.cat([
            torch.cat([getattr(self, f"token_prefix_{s}"), getattr(self, f"ctx_{s}"),
                       getattr(self, f"token_suffix_{s}")], dim=2).flatten(0, 1)
            for s in STATES])
        ids = torch.cat([getattr(self, f"tokenized_prompts_{s}").flatten(0, 1) for s in STATES])
        return embeddings, ids, list(self.compound_prompts_text)

    @staticmethod
    def hparams_from_state(state: dict[str, torch.Tensor]) -> dict[str, int]:
        """n_ctx, deep depth and length as stored in a checkpoint."""
        deep = sorted(int(k.split(".")[1]) for k in state if k.startswith("compound_prompts_text."))
        return {"n_ctx": int(state["ctx_pos"].shape[-2]),
                "deep_depth": len(deep) + 1,
                "deep_len": int(state[f"compound_prompts_text.{deep[0]}"].shape[0]) if deep else 4}
