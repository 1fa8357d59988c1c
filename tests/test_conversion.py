"""The conversion command (`ditopt export MODEL OUT -p PROFILE --report R --markdown M`): exit
codes 0 / 1 / 2, the report's schema, no artifact when the quality gate fails, the Markdown."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from typer.testing import CliRunner

from ditopt.cli import app
from ditopt.cli.conversion import SCHEMA, SCHEMA_VERSION
from conversion_models import UNREACHABLE

runner = CliRunner()
DOC = Path(__file__).resolve().parent.parent / "docs" / "conversion.md"
PROFILES = Path(__file__).resolve().parent.parent / "examples" / "profiles"


def _top_level(braced: str) -> set[str]:
    """`{a, b (note, more), c {x, y}}` -> {a, b, c}: the names an object documented so carries."""
    depth, kept = 0, []
    for ch in braced[1:-1]:
        depth += ch in "({"
        depth -= ch in ")}"
        if depth == 0 and ch not in ")}":
            kept.append(ch)
    return {name.strip() for name in "".join(kept).split(",")}


def check_against_docs(data: dict) -> set[str]:
    """The report has exactly the keys docs/conversion.md documents (the optimization report's,
    then the table's), and each documented object (or each entry of a documented list) exactly
    the fields listed for it. Returns the documented objects that were there to check."""
    text = DOC.read_text()
    inherited = re.findall(r"`([^`]+)`", re.search(r"\(the keys (.*?), which", text, re.S).group(1))
    table, fields = [], {}
    for line in text.splitlines():
        if line.startswith("| `"):
            key_cell, what = line.split(" | ")[:2]
            table += re.findall(r"`([^`]+)`", key_cell)
            braced = re.match(r"(?:per [^:]+: )?`(\{[^`]*\})`", what)
            if braced:
                fields[table[-1]] = _top_level(braced.group(1))
    assert len(inherited) == 10 and len(table) == 14 and len(fields) == 7  # the doc parsed as written
    assert set(data) == set(inherited) | {key.split(".")[0] for key in table}
    checked = set()
    for key, names in fields.items():
        value = data
        for part in key.split("."):
            value = value[part]
        for entry in value if isinstance(value, list) else [value] if value is not None else []:
            assert set(entry) == names, (key, sorted(entry), sorted(names))
            checked.add(key)
    return checked


def test_gate_passes_artifact_report_and_markdown(tmp_path):
    out, report, md = tmp_path / "artifact", tmp_path / "report.json", tmp_path / "summary.md"
    result = runner.invoke(app, ["export", "tiny-dit", str(out), "--report", str(report), "--markdown", str(md),
                                 "--timing-repeats", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["schema"] == SCHEMA and data["schema_version"] == SCHEMA_VERSION
    assert data["command"] == "export" and data["model"] == "tiny-dit"
    assert data["passed"] is True and data["gate"]["passed"] is True and data["gate"]["failure"] is None
    assert data["gate"]["budget"] == data["profile"]["budget"]
    assert {"gate", "quality.measured", "cost", "artifact", "versions"} <= check_against_docs(data)
    assert {"ditopt", "torch", "onnxruntime"} <= set(data["versions"]) and all(data["versions"][k] for k in ("ditopt", "torch"))
    # the artifact's digest is the sha256 of the manifest now at OUT (which lists every other file)
    manifest = (out / "manifest.json").read_bytes()
    assert data["artifact"]["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert data["artifact"]["files"] == len(json.loads(manifest)["files"]) + 1
    assert data["artifact"]["verification"]["max_rel_err"] < 1e-4  # checked against the PyTorch runtime
    cost = data["cost"]
    assert cost["macs"]["original"] > 0 and cost["macs"]["original"] == cost["macs"]["optimized"]  # identity
    assert cost["speedup"] > 0 and cost["repeats"] == 1
    assert [p["name"] for p in data["pass_configs"]] == [p["name"] for p in data["passes"]]
    assert [m["kind"] for m in data["quality"]["measured"]] == [v["kind"] for v in data["verification"]]
    summary = md.read_text()
    assert "**passed**" in summary and data["artifact"]["manifest_sha256"][:16] in summary
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary files


def test_unreachable_gate_exits_1_with_report_and_no_artifact(tmp_path):
    profile = tmp_path / "w8a8-200db.toml"
    profile.write_text(UNREACHABLE)
    out, report, md = tmp_path / "artifact", tmp_path / "report.json", tmp_path / "summary.md"
    result = runner.invoke(app, ["export", "conversion_models:calibrated_plain_dit", str(out), "-p", str(profile),
                                 "--report", str(report), "--markdown", str(md)])
    assert result.exit_code == 1, result.output
    assert not out.exists() and not list(tmp_path.glob(".artifact*"))  # nothing at OUT, no leftovers beside it
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["gate"]["passed"] is False and data["artifact"] is None
    assert "quality gate failed" in data["gate"]["failure"]
    measured = next(m for m in data["quality"]["measured"] if m["kind"] == "end-to-end")
    assert measured["passed"] is False and measured["samples"] == 4 and measured["psnr_lower_db"] < 200
    assert "validation=" in measured["samples_from"]  # measured on the factory's held-out sampler
    assert [p["name"] for p in data["pass_configs"]] == ["quantize"] and data["pass_configs"][0]["resolved"]["layers"]
    assert "Nothing was written at" in " ".join(result.output.split())
    assert "**FAILED**" in md.read_text() and "none written" in md.read_text()


def test_bad_input_exits_2_and_leaves_what_is_there(tmp_path):
    report = tmp_path / "report.json"
    assert runner.invoke(app, ["export", "no-such-model", str(tmp_path / "a"), "--report", str(report)]).exit_code == 2
    assert runner.invoke(app, ["export", "tiny-dit", str(tmp_path / "a"), "-p", "no-such-profile"]).exit_code == 2
    assert not report.exists() and not (tmp_path / "a").exists()
    # a directory the user owns: refused before optimizing, left exactly as it was
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    result = runner.invoke(app, ["export", "tiny-dit", str(mine)])
    assert result.exit_code == 2 and "--force" in result.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    inside = runner.invoke(app, ["export", "tiny-dit", str(tmp_path / "b"), "--report", str(tmp_path / "b" / "r.json")])
    assert inside.exit_code == 2 and "inside the artifact directory" in inside.output


def test_factory_dict_with_unknown_keys_is_bad_input(tmp_path, monkeypatch):
    import types
    import sys

    module = types.ModuleType("bad_factory_mod")
    module.make = lambda: {"model": None, "sampler": None}
    monkeypatch.setitem(sys.modules, "bad_factory_mod", module)
    result = runner.invoke(app, ["export", "bad_factory_mod:make", str(tmp_path / "a")])
    assert result.exit_code == 2 and "unknown: sampler" in " ".join(result.output.split())


def test_optimize_writes_the_same_schema_and_markdown(tmp_path):
    """A searched pass (the example quantize-30db profile) fills what identity leaves empty: the
    prediction against its target, the resolved per-layer choice."""
    report, md = tmp_path / "r.json", tmp_path / "r.md"
    result = runner.invoke(app, ["optimize", "conversion_models:calibrated_plain_dit", "-p", str(PROFILES / "quantize-30db.toml"),
                                 "--report", str(report), "--markdown", str(md), "--timing-repeats", "0"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["command"] == "optimize" and data["passed"] is True
    assert data["artifact"] is None and data["output"] is None and data["error"] is None
    assert data["cost"]["speedup"] is None and data["cost"]["macs"]["optimized"] > 0
    assert {"quality.predicted", "quality.measured", "pass_configs", "cost"} <= check_against_docs(data)
    (predicted,) = data["quality"]["predicted"]
    assert predicted["pass"] == "quantize" and predicted["predicted_psnr_db"] >= predicted["target_psnr_db"] >= 30
    (config,) = data["pass_configs"]
    assert config["config"]["low"] == "tlq4/int8" and config["resolved"]["layers"]  # what the search chose, per layer
    text = md.read_text()
    assert "### ditopt optimize: conversion_models:calibrated_plain_dit" in text and "none written" not in text
    assert f"{predicted['predicted_psnr_db']:.2f} dB" in text


def test_artifact_check_failure_exits_2_with_the_error_in_the_report(tmp_path, monkeypatch):
    """The gate passed but the written artifact disagrees with the PyTorch runtime (here: a check
    run whose output is noise): exit 2, nothing at OUT, the report says why."""
    import ditopt.cli as cli

    def noise(resolved, describe=False):
        run = lambda model: torch.randn(64)  # noqa: E731
        return (run, "noise") if describe else run

    monkeypatch.setattr(cli, "_verification_run", noise)
    out, report, md = tmp_path / "artifact", tmp_path / "report.json", tmp_path / "summary.md"
    result = runner.invoke(app, ["export", "tiny-dit", str(out), "--report", str(report), "--markdown", str(md),
                                 "--timing-repeats", "0"])
    assert result.exit_code == 2, result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "summary.md"]
    data = json.loads(report.read_text())
    assert data["gate"]["passed"] is True and data["passed"] is False and data["artifact"] is None
    assert "differ from the PyTorch runtime" in data["error"] and data["error"] in " ".join(result.output.split())
    assert f"Error: {data['error']}" in md.read_text() and "**FAILED**" in md.read_text()
