"""CLI: the block table, JSON output, exit codes (0 ok, 2 bad input)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ditopt.cli import app

runner = CliRunner()


def test_inspect_json_lists_blocks():
    result = runner.invoke(app, ["inspect", "tiny-flux", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_class"] == "FluxTransformer2DModel"
    assert [b["stream"] for b in data["blocks"]] == ["dual", "dual", "single", "single"]
    assert data["blocks"][0]["attention"][0]["text_tokens"] == 8


def test_optimize_identity_passes_gate():
    result = runner.invoke(app, ["optimize", "tiny-dit", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True


def test_bad_inputs_exit_2(tmp_path):
    assert runner.invoke(app, ["inspect", "no-such-model"]).exit_code == 2
    assert runner.invoke(app, ["optimize", "tiny-dit", "-p", "no-such-profile"]).exit_code == 2
    assert runner.invoke(app, ["inspect", "torch.nn:Identity"]).exit_code == 2  # not a DiT


def test_export_refuses_overwrite(tmp_path):
    out = tmp_path / "artifact"
    first = runner.invoke(app, ["export", "tiny-dit", str(out)])
    assert first.exit_code == 0, first.output
    assert (out / "manifest.json").is_file()
    assert runner.invoke(app, ["export", "tiny-dit", str(out)]).exit_code == 2
    assert runner.invoke(app, ["export", "tiny-dit", str(out), "--force"]).exit_code == 0
