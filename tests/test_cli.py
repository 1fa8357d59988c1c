"""CLI: the block table, JSON output, exit codes (0 ok, 1 quality gate failed, 2 bad input)."""

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
    # --verify (the default) ran the artifact beside the PyTorch runtime before writing it
    assert json.loads((out / "manifest.json").read_text())["verification"]["max_rel_err"] < 1e-4
    assert "matches the PyTorch runtime" in first.output
    assert runner.invoke(app, ["export", "tiny-dit", str(out), "--force", "--no-verify"]).exit_code == 0
    assert "verification" not in json.loads((out / "manifest.json").read_text())


def test_optimize_exits_1_and_says_why_when_the_gate_fails(monkeypatch, tmp_path):
    """A failed gate: exit code 1, the report still written, and the last line names what missed
    and what to change (here the per-call check, made to fail)."""
    import sys

    from ditopt.verify import Verification

    opt_mod = sys.modules["ditopt.optimize"]
    real = opt_mod.verify_per_call

    def failing(*args, **kwargs):
        result = real(*args, **kwargs)
        return Verification("per-call", 0.5, None, None, result.budget, False, result.details)

    monkeypatch.setattr(opt_mod, "verify_per_call", failing)
    report = tmp_path / "report.json"
    result = runner.invoke(app, ["optimize", "tiny-dit", "--report", str(report)])
    assert result.exit_code == 1, result.output
    assert json.loads(report.read_text())["passed"] is False
    assert "quality gate failed: one denoiser call differs from the original by relative error 0.5" in " ".join(result.output.split())
