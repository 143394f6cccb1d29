"""`zsad train`: learn a method's prompts/adapters on an auxiliary dataset."""
from __future__ import annotations

import typer

from zsadcli.errors import NotAvailableYet


def train(ctx: typer.Context) -> None:
    """Learn a method's prompts/adapters on an auxiliary dataset (e.g. MVTec AD).

    Not available in this version yet: it arrives with the first method (AnomalyCLIP).
    """
    raise NotAvailableYet("`zsad train` is not available yet in this version.",
                          hint="see README.md for what works today")
