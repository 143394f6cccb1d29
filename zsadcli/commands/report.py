"""`zsad report`: one self-contained HTML page from eval run folders."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zsadcli.atomic import refuse_overwrite
from zsadcli.commands.common import JsonOpt, QuietOpt, merge_options
from zsadcli.console import emit_json, log


def report(
    ctx: typer.Context,
    run_dirs: Annotated[list[Path], typer.Argument(help="Eval run folders (runs/eval/NAME); several are compared.",
                                                   show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.")] = Path("report.html"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write ONE HTML file that opens offline: per run a header (method, weights and sha256,
    protocol, precision, device, version, date, wall time), per dataset the per-class table with
    the mean, ROC/PR curves, score histograms with thresholds and galleries; with several runs a
    methods x datasets table of means, best per column marked. Reads the run folders only.
    """
    from zsadcli.core.report import require_report_extra, write_eval_report

    opts = merge_options(ctx, json=json, quiet=quiet)
    require_report_extra()
    refuse_overwrite(out, force, "report")
    written = write_eval_report(run_dirs, out)
    if opts.json:
        emit_json({"report": str(written), "runs": [str(p) for p in run_dirs]})
    else:
        log(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB)")
