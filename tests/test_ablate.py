"""`zsad ablate`: every switch evaluated against the full method on the same data."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from test_commands import TINY, checkpoint  # noqa: F401  (fixture)
from zsadcli.cli import app


def test_list_switches():
    result = CliRunner().invoke(app, ["ablate", "--method", "anomalyclip", "--list", "--json"])
    assert result.exit_code == 0
    assert set(json.loads(result.stdout)) == {"no-dpam", "no-deep-prompts", "all-layers", "no-smoothing"}


def test_ablation_table_rows_and_deltas(tmp_path, checkpoint, synthetic_root):  # noqa: F811
    runner = CliRunner()
    data = synthetic_root.parent
    result = runner.invoke(app, ["ablate", "--test-on", synthetic_root.name, "--data-root", str(data),
                                 "--checkpoint", str(checkpoint), *TINY, "--switches", "no-dpam,no-smoothing",
                                 "--runs", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["variant"] for r in rows] == ["full", "no-dpam", "no-smoothing"]
    assert all(v == 0 for v in rows[0]["deltas"].values())
    assert any(abs(v) > 1e-6 for v in rows[1]["deltas"].values())
    # the switch changes only the map: image-level numbers stay, pixel-level ones move
    assert abs(rows[1]["deltas"]["image_auroc"]) < 1e-9 and abs(rows[1]["deltas"]["pixel_auroc"]) > 1e-6
    assert {p.name for p in (tmp_path / "ablate").iterdir()} == {f"anomalyclip-{synthetic_root.name}"}
    bad = runner.invoke(app, ["ablate", "--test-on", synthetic_root.name, "--data-root", str(data), "--checkpoint",
                              str(checkpoint), *TINY, "--switches", "no-such", "--runs", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no ablation switch" in bad.output
