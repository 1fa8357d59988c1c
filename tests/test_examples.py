"""Every example in examples/ runs (at reduced size) and does what it says; the CI workflow is
well-formed and its script converts a model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deploy_diffusers_drops_the_optimized_transformer_into_the_pipeline(tmp_path):
    result = load_example("deploy_diffusers").main(["--small", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert result["pipeline_transformer_is_optimized"] and result["passed"]
    assert [p["name"] for p in result["passes"]] == ["quantize"] and result["passes"][0]["applied"]
    # the budget held on the held-out seeds, and on a seed neither calibration nor validation saw
    assert result["held_out_psnr_lower_db"] >= 30 and result["psnr_db_new_seed"] >= 30
    assert result["seconds_per_generation"]["original"] > 0 and result["seconds_per_generation"]["optimized"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["speedup"] == result["speedup"]


def test_custom_dit_with_a_hand_written_profile():
    example = load_example("custom_dit")
    result = example.main(["--small"])
    assert result["blocks_found"] == 2  # recovered from the graph of a model ditopt has no adapter for
    assert result["profile"] == "custom-dit-w8a8" and result["budget_min_psnr_db"] == 30
    assert [(p["name"], p["applied"], p["modified"]) for p in result["passes"]] == [
        ("conditioning_memo", True, True), ("quantize", True, True)]
    assert result["passed"] and result["held_out_psnr_lower_db"] >= 30
    assert result["model_unchanged"] and result["output_shape"] == [2, 4, 16, 16]


def test_export_and_serve_samples_from_a_fresh_process(tmp_path):
    out = tmp_path / "artifact"
    result = load_example("export_and_serve").main([str(out), "--small"])
    assert result["served_by_pid"] != result["pid"]
    assert result["served_vs_pytorch_rel_err"] < 1e-4 and result["served_shape"] == [2, 8, 8, 8]
    manifest = json.loads((out / "manifest.json").read_text())
    assert result["segments"] == [s["name"] for s in manifest["segments"]]
    assert result["files"] == len(manifest["files"]) + 1
    assert result["bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # the serving scratch files are gone


def test_ci_workflow_is_well_formed():
    workflow = yaml.safe_load((EXAMPLES / "ci" / "convert.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "push" in triggers
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] and isinstance(job["steps"], list)
    for step in job["steps"]:
        assert ("uses" in step) != ("run" in step), step
    convert = [s for s in job["steps"] if "examples/ci/convert.sh" in s.get("run", "")]
    assert len(convert) == 1 and "if" not in convert[0]  # a gate miss fails this step and the job
    script = EXAMPLES.parent / convert[0]["run"].split()[-1]
    assert script.is_file() and os.access(script, os.X_OK)
    uploads = {s["with"]["name"]: s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")}
    assert uploads["conversion-report"]["if"] == "always()" and uploads["ditopt-artifact"]["if"] == "success()"
    out = job["env"]["DITOPT_OUT"]
    assert f"{out}/report.json" in uploads["conversion-report"]["with"]["path"]
    assert uploads["ditopt-artifact"]["with"]["path"] == f"{out}/artifact"
    assert "GITHUB_STEP_SUMMARY" in script.read_text()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("ditopt") is None, reason="needs bash and the ditopt command")
def test_ci_script_converts_and_writes_the_job_summary(tmp_path):
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary), "DITOPT_OUT": str(tmp_path / "convert")}
    run = subprocess.run(["bash", str(EXAMPLES / "ci" / "convert.sh"), "tiny-dit", "identity"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "convert" / "report.json").read_text())
    assert report["passed"] and (tmp_path / "convert" / "artifact" / "manifest.json").is_file()
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "### ditopt export: tiny-dit" in text  # appended, not replaced
