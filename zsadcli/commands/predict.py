"""`zsad predict`: anomaly heatmaps and scores for images."""
from __future__ import annotations

import typer

from zsadcli.errors import NotAvailableYet


def predict(ctx: typer.Context) -> None:
    """Write heatmap overlay PNGs and image scores for images, folders or globs.

    Not available in this version yet: it arrives with the first method (AnomalyCLIP).
    """
    raise NotAvailableYet("`zsad predict` is not available yet in this version.",
                          hint="see README.md for what works today")
