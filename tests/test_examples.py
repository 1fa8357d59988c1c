"""Every example in examples/ runs (at reduced size) and does what it says; the CI files (GitHub
Actions workflow, GitLab CI job) pass their schemas and mean what they say, and the script they
call converts a model, or fails the job with the report and no artifact when the gate misses."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conversion_models import UNREACHABLE

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CI = EXAMPLES / "ci"
# check-jsonschema's schemas ship inside the package (no network): GitHub's workflow schema and GitLab's.
SCHEMAS = {"convert.yml": "vendor.github-workflows", "gitlab-ci.yml": "vendor.gitlab-ci"}


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deploy_diffusers_drops_the_optimized_transformer_into_the_pipeline(tmp_path, capsys):
    example = load_example("deploy_diffusers")
    result = example.main(["--small", "--samples", "3", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert result["pipeline_transformer_is_optimized"] and result["passed"]
    assert [p["name"] for p in result["passes"]] == ["quantize"] and result["passes"][0]["applied"]
    # the budget held on as many held-out samples as calibration drew, and on a seed neither saw
    assert result["calibration_samples"] == 3 and result["held_out_samples"] == 3 and result["steps"] == 6
    assert result["held_out_psnr_lower_db"] >= 30 and result["psnr_db_new_seed"] >= 30
    assert result["seconds_per_generation"]["original"] > 0 and result["seconds_per_generation"]["optimized"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["speedup"] == result["speedup"]
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(printed[-1]) == json.loads(json.dumps(result))
    assert any("3 held-out samples (other seeds; classes [3, 4, 5], calibration drew [0, 1, 2])" in line for line in printed)
    assert example.written_here(tmp_path / "r.json")  # its own result: a rerun may overwrite it


def test_deploy_diffusers_default_profile_is_balanced_with_a_narrowed_search():
    """The full-size default (not run here: 30 s on 2 idle cores, minutes on busy ones)."""
    import ditopt

    quick, balanced = ditopt.load_profile(load_example("deploy_diffusers").balanced_quick()), ditopt.load_profile("balanced")
    assert quick.name == "balanced-quick" and quick.budget == balanced.budget and quick.backend == balanced.backend
    assert [e.name for e in quick.passes] == [e.name for e in balanced.passes]
    for mine, preset in zip(quick.passes, balanced.passes):
        changed = {k: v for k, v in mine.config.model_dump().items() if preset.config.model_dump()[k] != v}
        assert changed == ({"forecast": "fitted", "warmup": 2} if mine.name == "calibrated_schedule" else {}), mine.name


def test_deploy_diffusers_refuses_to_overwrite_a_file_it_did_not_write(tmp_path, capsys):
    other = tmp_path / "notes.json"
    other.write_text('{"mine": true}\n')
    with pytest.raises(SystemExit) as stop:
        load_example("deploy_diffusers").main(["--small", "--json", str(other)])
    assert stop.value.code == 2 and "not a result this example wrote" in capsys.readouterr().err
    assert other.read_text() == '{"mine": true}\n'


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
    workflow = yaml.safe_load((CI / "convert.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "push" in triggers and "pull_request" in triggers
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
    # the pull-request comment: on pull requests only, after a gate miss too, never failing the job
    (comment,) = [s for s in job["steps"] if "gh pr comment" in s.get("run", "")]
    assert comment["if"] == "always() && github.event_name == 'pull_request'" and comment["continue-on-error"] is True
    assert comment["env"]["GH_TOKEN"] == "${{ github.token }}"
    assert workflow["permissions"] == {"contents": "read", "pull-requests": "write"}


class Recorder:
    """A stand-in for a command (gh, curl) on PATH: writes its arguments, one a line, to LOG."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        self.bin, self.log = tmp_path / "bin", tmp_path / f"{name}.args"
        self.bin.mkdir(exist_ok=True)
        tool = self.bin / name
        tool.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{self.log}"\n')
        tool.chmod(0o755)

    def path(self) -> str:
        return os.pathsep.join([str(self.bin), os.environ["PATH"]])

    def args(self) -> list[str] | None:
        return self.log.read_text().splitlines() if self.log.exists() else None


def run_shell(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-c", script], cwd=EXAMPLES.parent, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_pr_comment_step_posts_the_summary_file(tmp_path):
    """The step's own script, with a stand-in gh: what it is given. GitHub running it is not tested."""
    (job,) = yaml.safe_load((CI / "convert.yml").read_text())["jobs"].values()
    (comment,) = [s for s in job["steps"] if "gh pr comment" in s.get("run", "")]
    gh = Recorder(tmp_path, "gh")
    out = tmp_path / "convert"
    env = {**os.environ, "PATH": gh.path(), "DITOPT_OUT": str(out), "PR_NUMBER": "17",
           "GITHUB_REPOSITORY": "owner/repo", "GH_TOKEN": "unused"}
    nothing = run_shell(comment["run"], env)  # the conversion stopped before writing a summary
    assert nothing.returncode == 0 and gh.args() is None and "nothing to comment" in nothing.stdout
    out.mkdir()
    (out / "summary.md").write_text("### ditopt export: m with `p`: **FAILED**\n")
    posted = run_shell(comment["run"], env)
    assert posted.returncode == 0, posted.stderr
    assert gh.args() == ["pr", "comment", "17", "--repo", "owner/repo", "--body-file", str(out / "summary.md")]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("ditopt") is None, reason="needs bash and the ditopt command")
def test_ci_script_converts_and_writes_the_job_summary(tmp_path):
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary), "DITOPT_OUT": str(tmp_path / "convert")}
    run = subprocess.run(["bash", str(CI / "convert.sh"), "tiny-dit", "identity"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "convert" / "report.json").read_text())
    assert report["passed"] and (tmp_path / "convert" / "artifact" / "manifest.json").is_file()
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "### ditopt export: tiny-dit" in text  # appended, not replaced


def schema_check(path: Path, schema: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_ci_files_pass_their_schema(name):
    run = schema_check(CI / name, SCHEMAS[name])
    assert run.returncode == 0, run.stdout + run.stderr


# Each broken copy still parses as YAML: only the schema check catches what is wrong.
BROKEN = [
    ("convert.yml", "    steps:", "    step:", "'step' was unexpected"),
    ("convert.yml", "timeout-minutes: 60", "timeout-minutes: sixty", "sixty"),
    ("convert.yml", "  pull-requests: write", "  pull-requests: post", "post"),
    ("gitlab-ci.yml", "  script:", "  scripts:", "'scripts' was unexpected"),
    ("gitlab-ci.yml", "    when: always", "    when: sometimes", "sometimes"),
]


@pytest.mark.parametrize("name, old, new, named", BROKEN)
def test_schema_check_fails_on_a_broken_copy(tmp_path, name, old, new, named):
    text = (CI / name).read_text()
    assert text.count(old) == 1
    broken = tmp_path / name
    broken.write_text(text.replace(old, new))
    yaml.safe_load(broken.read_text())
    run = schema_check(broken, SCHEMAS[name])
    assert run.returncode == 1 and named in run.stdout, run.stdout + run.stderr


def gitlab_job() -> dict:
    (job,) = yaml.safe_load((CI / "gitlab-ci.yml").read_text()).values()  # one job, no global keys
    return job


def test_gitlab_job_mirrors_the_workflow():
    job = gitlab_job()
    (workflow_job,) = yaml.safe_load((CI / "convert.yml").read_text())["jobs"].values()
    assert job["variables"] == workflow_job["env"]  # same model, profile and output folder
    assert job["script"] == ["bash examples/ci/convert.sh"] and "allow_failure" not in job  # a gate miss fails the job
    out = job["variables"]["DITOPT_OUT"]
    assert job["artifacts"]["when"] == "always"  # the report is kept on failure too
    assert sorted(job["artifacts"]["paths"]) == [f"{out}/artifact/", f"{out}/report.json", f"{out}/summary.md"]
    assert any("summary.md" in line for line in job["after_script"])  # GitLab has no job summary: the log


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("ditopt") is None, reason="needs bash and the ditopt command")
def test_gitlab_job_fails_on_a_gate_miss_and_keeps_report_and_summary(tmp_path):
    """The job's own script and after_script, as GitLab runs them, on a profile whose gate cannot pass."""
    job = gitlab_job()
    profile = tmp_path / "w8a8-200db.toml"
    profile.write_text(UNREACHABLE)
    out = tmp_path / "convert"
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, **job["variables"], "DITOPT_MODEL": "conversion_models:calibrated_plain_dit",
           "DITOPT_PROFILE": str(profile), "DITOPT_OUT": str(out),
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    env.pop("GITHUB_STEP_SUMMARY", None)
    env.pop("DITOPT_NOTE_TOKEN", None)  # no merge-request note from this test
    run = lambda lines: subprocess.run(["bash", "-e", "-c", "\n".join(lines)], cwd=EXAMPLES.parent, env=env,
                                       capture_output=True, text=True, timeout=600)
    script = run(job["script"])
    assert script.returncode == 1, script.stdout[-2000:] + script.stderr[-2000:]
    assert "quality gate failed" in script.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["artifact"] is None
    after = run(job["after_script"])
    assert after.returncode == 0 and "**FAILED**" in after.stdout
    # what GitLab keeps (`when: always`): the report and the summary; the artifact path is empty
    prefix = job["variables"]["DITOPT_OUT"]
    kept = sorted(p for p in job["artifacts"]["paths"] if (out / p[len(prefix) + 1:]).exists())
    assert kept == [f"{prefix}/report.json", f"{prefix}/summary.md"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gitlab_merge_request_note_only_with_token_and_merge_request(tmp_path):
    """The after_script's note command, with a stand-in curl: posted to the merge request's notes
    with the summary as body when DITOPT_NOTE_TOKEN and CI_MERGE_REQUEST_IID are set, else not run.
    GitLab accepting it is not tested."""
    (note,) = [line for line in gitlab_job()["after_script"] if "curl" in line]
    curl = Recorder(tmp_path, "curl")
    out = tmp_path / "convert"
    out.mkdir()
    (out / "summary.md").write_text("### ditopt export: m with `p`: **passed**\n")
    base = {**os.environ, "PATH": curl.path(), "DITOPT_OUT": str(out), "CI_API_V4_URL": "https://gitlab.example/api/v4",
            "CI_PROJECT_ID": "42"}
    for missing in ("DITOPT_NOTE_TOKEN", "CI_MERGE_REQUEST_IID"):
        env = {**base, "DITOPT_NOTE_TOKEN": "tok", "CI_MERGE_REQUEST_IID": "7"}
        del env[missing]
        assert run_shell(note, env).returncode == 0 and curl.args() is None, missing
    run = run_shell(note, {**base, "DITOPT_NOTE_TOKEN": "tok", "CI_MERGE_REQUEST_IID": "7"})
    assert run.returncode == 0, run.stderr
    args = curl.args()
    assert args[-1] == "https://gitlab.example/api/v4/projects/42/merge_requests/7/notes"
    assert args[args.index("--header") + 1] == "PRIVATE-TOKEN: tok" and args[args.index("--request") + 1] == "POST"
    assert args[args.index("--data-urlencode") + 1] == f"body@{out / 'summary.md'}" and "--fail" in args
