"""`zsad ablate`: switch a method's modules off one at a time and tabulate the effect."""
from __future__ import annotations

import typer

from zsadcli.errors import NotAvailableYet


def ablate(ctx: typer.Context) -> None:
    """Evaluate a method with each of its ablation switches turned off in turn.

    Not available in this version yet.
    """
    raise NotAvailableYet("`zsad ablate` is not available yet in this version.",
                          hint="see README.md for what works today")
