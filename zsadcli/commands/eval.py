"""`zsad eval`: per-class and mean metrics of a method on test datasets."""
from __future__ import annotations

import typer

from zsadcli.errors import NotAvailableYet


def evaluate(ctx: typer.Context) -> None:
    """Score every class of one or more datasets (image AUROC/AP/F1-max, pixel AUROC/AP/F1-max/AUPRO).

    Not available in this version yet: it arrives with the first method (AnomalyCLIP).
    """
    raise NotAvailableYet("`zsad eval` is not available yet in this version.",
                          hint="see README.md for what works today")
