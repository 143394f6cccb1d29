"""The `zsad` command line: global options and the subcommands."""
from __future__ import annotations

import typer

from zsadcli import __version__
from zsadcli.commands import (ablate, calibrate, doctor, eval as eval_cmd, export as export_cmd, predict, prepare,
                              report, train, weights)
from zsadcli.commands.common import (DeviceOpt, GlobalOptions, JsonOpt, MaxImagePixelsOpt, PrecisionOpt, QuietOpt,
                                     SeedOpt, guard, merge_options)

app = typer.Typer(
    name="zsad",
    help="Zero-shot visual anomaly detection with CLIP: prepare datasets, train prompts on an "
         "auxiliary set, evaluate on new domains, predict heatmaps. Logs go to stderr, --json "
         "results to stdout. Exit codes: 0 ok, 1 unexpected error, 2 bad input, "
         "3 weights unavailable offline, 4 checksum mismatch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"zsad {__version__}")
        raise typer.Exit()


@app.callback()
@guard
def main_options(
    ctx: typer.Context,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    max_image_pixels: MaxImagePixelsOpt = None,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Global options; every subcommand also accepts them after its name."""
    ctx.obj = GlobalOptions()
    ctx.obj = merge_options(ctx, device=device, precision=precision, seed=seed, json=json, quiet=quiet,
                            max_image_pixels=max_image_pixels)


app.command("prepare")(guard(prepare.prepare))
app.command("train")(guard(train.train))
app.command("eval")(guard(eval_cmd.evaluate))
app.command("predict")(guard(predict.predict))
app.command("ablate")(guard(ablate.ablate))
app.command("export")(guard(export_cmd.export))
app.command("calibrate")(guard(calibrate.calibrate))
app.command("report")(guard(report.report))
app.add_typer(weights.app, name="weights")
app.command("doctor")(guard(doctor.doctor))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
