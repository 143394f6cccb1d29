"""Ablation: evaluate a method with each of its switches turned off in turn, next to the full
method, on the same data, weights and metric variant."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.core.evaluation import IMAGE_COLUMNS, PIXEL_COLUMNS, DatasetResult, evaluate_dataset
from zsadcli.data.meta import Meta
from zsadcli.errors import BadInput

FULL = "full"


@dataclass
class AblationRow:
    variant: str  # "full" or the switch that was turned off
    dataset: str
    means: dict[str, float]  # e.g. "image_auroc" -> x100 class mean
    deltas: dict[str, float]  # variant - full, x100

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "dataset": self.dataset, "means": self.means, "deltas": self.deltas}


def _means(result: DatasetResult) -> dict[str, float]:
    out = {f"image_{k}": 100 * result.mean["image"][k]["mean"] for k in IMAGE_COLUMNS}
    out.update({f"pixel_{k}": 100 * result.mean["pixel"][k]["mean"] for k in PIXEL_COLUMNS})
    return out


def run_ablation(spec: MethodSpec, switches: list[str], datasets: dict[str, tuple[str, Meta]], *,
                 batch_size: int, aupro_variant: str, class_name: str | None = None,
                 workers: int | None = 0) -> list[AblationRow]:
    """``datasets``: name -> (root, meta). Rows: the full method, then one row per switch."""
    from zsadcli.core.methods import get_method

    known = get_method(spec.method).ablations
    unknown = [s for s in switches if s not in known]
    if unknown:
        raise BadInput(f"{spec.method} has no ablation switch {', '.join(unknown)}.",
                       hint=f"its switches: {', '.join(known) or '(none)'}")
    rows: list[AblationRow] = []
    full: dict[str, dict[str, float]] = {}
    for variant in [FULL, *switches]:
        ablate = spec.ablate if variant == FULL else spec.ablate | {variant}
        method = build_method(replace(spec, ablate=frozenset(ablate))).method
        for name, (root, meta) in datasets.items():
            means = _means(evaluate_dataset(method, name, root, meta, batch_size=batch_size,
                                            aupro_variant=aupro_variant, class_name=class_name, workers=workers))
            if variant == FULL:
                full[name] = means
            deltas = {k: (v - full[name][k]) if not (math.isnan(v) or math.isnan(full[name][k])) else math.nan
                      for k, v in means.items()}
            rows.append(AblationRow(variant, name, means, deltas))
    return rows
