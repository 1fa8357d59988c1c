"""The model benchmark harness: a tiny quick run checks the output format (JSON keys, markdown
rows, PNG), the reference-vs-itself PSNR handling and the "no effect" marking. No timing asserts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ditopt.bench import METHODS, markdown_table, run_models, settings_for
from ditopt.bench.methods import MethodSetting, Runner
from ditopt.bench.report import TABLE_COLUMNS

METHODS_UNDER_TEST = ["diffusers-taylorseer", "ditopt-residual"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_models(["dit-digits"], METHODS_UNDER_TEST, samples=2, repeats=1, batch=2, threads=1,
                        quick=True, steps=4, out_dir=out, command="pytest quick", progress=False)
    return result, out


def test_outputs_written(quick_run):
    result, out = quick_run
    for name in ("models.json", "models.md", "models_pareto.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "models_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "models.json").read_text())  # strict JSON: no NaN/Infinity
    assert data == json.loads(json.dumps(data, allow_nan=False))
    for key in ("schema", "command", "date", "machine", "config", "models", "complete"):
        assert key in data
    assert data["complete"] is True and data["command"] == "pytest quick"
    for key in ("cpu_model", "logical_cpus", "torch_threads", "torch"):
        assert key in data["machine"]
    assert data["machine"]["torch_threads"] == 1


def test_rows_and_fields(quick_run):
    result, out = quick_run
    model = result["models"]["dit-digits"]
    assert model["steps"] == 4
    keys = [r["key"] for r in model["results"]]
    assert keys[0] == "baseline[reference]"
    assert {r["method"] for r in model["results"]} == {"baseline", *METHODS_UNDER_TEST}
    for r in model["results"]:
        assert r["status"] in ("reference", "ok", "exact", "no effect", "unsupported", "failed"), r
        if r["status"] in ("unsupported", "failed"):
            continue
        assert len(r["timing"]["s_per_sample"]) == 1
        assert r["timing"]["median_s_per_sample"] > 0
        assert r["macs_per_sample"] > 0
        assert r["peak_alloc_mib"] is None or r["peak_alloc_mib"] >= 0
        for q in ("psnr_db", "ssim", "class_accuracy", "ffd", "identical_to_reference"):
            assert q in r["quality"]
    rows = {r["method"]: r for r in model["results"]}
    # the peer (static TaylorSeer schedule, interval 2 after 3 warm-up steps) must take effect at 4 steps
    peer = rows["diffusers-taylorseer"]
    assert peer["status"] == "ok" and peer["mac_ratio"] < 1.0, peer
    assert peer["quality"]["psnr_db"] is not None and math.isfinite(peer["quality"]["psnr_db"])
    # ditopt's pass is measured like any other method; whether it saves MACs is reported, not assumed
    assert rows["ditopt-residual"]["status"] in ("ok", "no effect")


def test_reference_psnr_is_inf_handled(quick_run):
    result, out = quick_run
    base = result["models"]["dit-digits"]["results"][0]
    assert base["status"] == "reference"
    assert base["quality"]["psnr_db"] is None and base["quality"]["identical_to_reference"] is True
    assert base["quality"]["ssim"] == pytest.approx(1.0)
    assert base["speedup"] == pytest.approx(1.0) and base["mac_ratio"] == pytest.approx(1.0)
    md = (out / "models.md").read_text()
    assert "inf (identical)" in md


def test_markdown_table_rows(quick_run):
    result, out = quick_run
    table = markdown_table(result["models"]["dit-digits"]).strip().splitlines()
    assert table[0] == "| " + " | ".join(TABLE_COLUMNS) + " |"
    body = table[2:]
    assert len(body) == len(result["models"]["dit-digits"]["results"])
    assert all(line.count("|") == len(TABLE_COLUMNS) + 1 for line in body)
    md = (out / "models.md").read_text()
    assert "## dit-digits" in md and "command: `pytest quick`" in md


def test_no_effect_is_marked_not_dropped(tmp_path, monkeypatch):
    """A 'peer' that changes nothing stays in the results, marked 'no effect'."""
    import ditopt.bench.methods as methods

    def build_noop(ctx, params):
        return Runner(ctx.bundle.model, None, {})

    monkeypatch.setitem(methods.METHODS, "noop-peer", {"family": "noop", "provider": "test", "build": build_noop,
                                                       "settings": [("none", {})]})
    result = run_models(["dit-digits"], ["noop-peer"], samples=2, repeats=1, batch=2, threads=1, quick=True, steps=2,
                        progress=False)
    rows = result["models"]["dit-digits"]["results"]
    assert [r["status"] for r in rows] == ["reference", "no effect"]
    assert "did not drop" in rows[1]["reason"]


def test_an_exact_setting_must_keep_the_samples(monkeypatch):
    """A setting declared exact is 'exact' when its samples equal the reference bit for bit and
    'failed' when they do not (a perturbing model stands in for a broken exact pass)."""
    import ditopt.bench.methods as methods

    class Perturbed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            out = self.inner(*args, **kwargs)
            return (out[0] * (1 + 1e-3),) + tuple(out[1:])

    builds = {"same": lambda ctx, p: Runner(ctx.bundle.model, None, {}),
              "changed": lambda ctx, p: Runner(Perturbed(ctx.bundle.model), None, {})}
    for name, build in builds.items():
        monkeypatch.setitem(methods.METHODS, f"exact-{name}", {"family": "exact", "provider": "test", "build": build,
                                                             "settings": [("exact", {"exact": True})]})
    result = run_models(["dit-digits"], ["exact-same", "exact-changed"], samples=2, repeats=1, batch=2, threads=1,
                        quick=True, steps=2, progress=False)
    status = {r["method"]: (r["status"], r["reason"]) for r in result["models"]["dit-digits"]["results"]}
    assert status["exact-same"] == ("exact", "samples identical to the reference")
    assert status["exact-changed"] == ("failed", "an exact pass changed the samples")


def test_a_missed_gate_is_marked_in_the_table_and_notes(quick_run):
    from ditopt.bench.report import gate_missed, row_notes

    result, _ = quick_run
    model = json.loads(json.dumps(result["models"]["dit-digits"]))
    row = next(r for r in model["results"] if r["status"] == "ok")
    assert not gate_missed(row)
    row["info"] = {"passed": False, "profile": {"budget": {"min_psnr_db": 45.0}},
                   "verification": [{"kind": "end-to-end", "passed": False, "psnr_db": 46.4, "psnr_lower_db": 44.9}]}
    line = next(line for line in markdown_table(model).splitlines() if f"| {row['setting']} |" in line)
    assert "ok, gate missed" in line
    assert any("gate **missed**" in n and "44.9 dB" in n and "45.0 dB" in n for n in row_notes(model))


def test_a_row_whose_gate_missed_counts_toward_no_target():
    """render_benchmarks: the Pareto lead and the realized/MAC range leave out a ditopt row whose
    held-out gate missed (optimize would have refused that model), however fast it measured."""
    render = _benchmark_script("render_benchmarks")

    def row(method, provider, speedup, psnr, passed=True):
        return {"method": method, "family": method, "provider": provider, "setting": "s", "key": f"{method}[s]",
                "status": "ok", "speedup": speedup, "mac_ratio": 0.5, "quality": {"psnr_db": psnr},
                "info": {"passed": passed} if provider == "ditopt" else {}}

    model = {"results": [row("baseline", "reference", 1.0, 99.0), row("peer", "diffusers", 2.0, 40.0),
                         row("ditopt-budget", "ditopt", 2.2, 41.0), row("ditopt-budget", "ditopt", 9.0, 45.0, passed=False)]}
    model["results"][-1]["key"] = "ditopt-budget[fast-but-refused]"
    assert [r["key"] for r in render._ok_rows(model)] == ["baseline[s]", "peer[s]", "ditopt-budget[s]"]
    lead = next(line for line in render._targets("dit-digits", model) if line.startswith("- Pareto lead"))
    assert "1.10x to 1.10x" in lead


def test_composition_verdict_counts_only_gated_rows_at_the_budget():
    render = _benchmark_script("render_benchmarks")

    def row(key, speedup, psnr, passed=True):
        method = key.split("[")[0]
        return {"method": method, "family": method, "provider": "ditopt", "setting": key, "key": key, "status": "ok",
                "speedup": speedup, "quality": {"psnr_db": psnr}, "info": {"passed": passed}}

    rows = [row("ditopt-preset[balanced]", 4.0, 31.0), row("ditopt-attention[NA auto]", 1.5, 33.0),
            row("ditopt-attention[NA auto+balanced]", 5.0, 30.4)]
    assert "**met**" in render._composition_verdict({"results": rows})
    rows[-1]["speedup"] = 3.9  # slower than caching alone
    assert "**missed**" in render._composition_verdict({"results": rows})
    rows[-1].update(speedup=9.0, info={"passed": False})  # fast, but its gate missed: optimize refused it
    assert "**missed**" in render._composition_verdict({"results": rows})
    rows[-1].update(info={"passed": True}, quality={"psnr_db": 29.5})  # below the balanced budget
    assert "**missed**" in render._composition_verdict({"results": rows})


def test_export_section_reads_the_export_benchmark(tmp_path):
    import json

    render = _benchmark_script("render_benchmarks")
    assert render.export_section(tmp_path) == []  # no run: no section

    def row(setting, seconds, psnr, **extra):
        return {"setting": setting, "s_per_sample": seconds, "speedup_vs_eager": 1.0 / seconds, "psnr_db_mean": psnr,
                "psnr_identical": False, **extra}

    result = {"command": "python benchmarks/bench_export.py", "date": "d", "wall_s": 1.0,
              "machine": {"cpu_model": "cpu", "torch_threads": 2}, "config": {"samples": 16, "batch": 4, "repeats": 5},
              "models": {"m": {"rows": [row("eager", 1.0, None), row("balanced: PyTorch runtime", 0.25, 29.5),
                                         row("balanced: artifact (onnxruntime)", 0.5, 29.5, max_abs_diff_vs_runtime=2e-6)],
                               "plans": {"balanced": {"export_s": 3.0, "gate_passed": True, "steps": 50, "compute_steps": [0, 5, 9],
                                                      "files": ["manifest.json", "plan.safetensors", "segments/a.onnx"]}}}}}
    (tmp_path / "export.json").write_text(json.dumps(result))
    text = "\n".join(render.export_section(tmp_path))
    assert "| m | balanced: artifact (onnxruntime) | 0.500 | 2.00x | 29.50 | 2.0e-06 (vs the PyTorch runtime) |" in text
    assert "3 of 50 steps computed, held-out gate passed" in text and "1 ONNX segments" in text
    assert "0.50 dB under its 30 dB budget" in text  # a plan that reads under its budget on these seeds says so


def test_settings_expand():
    full = settings_for(list(METHODS))
    assert full[0].method == "baseline"
    exact = {"baseline", "ditopt-memo", "ditopt-layout"}  # no quality trade-off to sweep
    for m in METHODS:
        n = sum(1 for s in full if s.method == m)
        assert n >= (1 if m in exact else 3), m
    quick = settings_for(list(METHODS), quick=True)
    assert len(quick) == len(METHODS) and all(isinstance(s, MethodSetting) for s in quick)
    with pytest.raises(ValueError):
        settings_for(["no-such-method"])


def test_only_keeps_the_named_settings_and_the_baseline():
    keys = ["ditopt-preset[balanced]", "ditopt-attention[NA auto]"]
    picked = settings_for(["ditopt-preset", "ditopt-attention"], only=keys)
    assert [s.key for s in picked] == ["baseline[reference]", *keys]
    with pytest.raises(ValueError, match=r"ditopt-preset\[medium\]"):
        settings_for(["ditopt-preset"], only=["ditopt-preset[medium]"])


def test_prebuilt_program_is_the_one_sampling_uses():
    """The runner captures the benchmark's batch shape before counting MACs; if that call did
    not match the sampler's, sampling would capture again inside the count (one extra forward)."""
    import ditopt
    from ditopt import zoo
    from ditopt.bench.methods import _prebuild

    bundle = zoo.load("dit-digits")
    opt = ditopt.optimize(bundle.model, "identity", example_inputs=bundle.make_inputs(2), num_steps=2)
    _prebuild(opt, bundle, 3)
    programs = len(opt.programs)
    bundle.sample([0, 1, 2], [1, 2, 3], steps=2, model=opt)
    assert len(opt.programs) == programs


def _benchmark_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merging_a_merge_keeps_only_the_runs_whose_models_it_keeps():
    """benchmarks/merge_results.py: a newer dit run merged into an older two-model merge replaces
    dit, and the header names the flux run and the new dit run only, with their own wall times."""
    module = _benchmark_script("merge_results")

    def run(command, date, models):
        return {"command": command, "date": date, "complete": True, "wall_s": 1.0, "config": {"models": list(models)},
                "machine": {"loadavg_at_start": [date], "loadavg_at_end": [date]},
                "models": {m: {"wall_s": w, "results": []} for m, w in models.items()}}

    old = module.merge([run("dit-old", "2026-01-01", {"dit": 100.0}), run("flux", "2026-01-02", {"flux": 20.0})])
    assert old["wall_s"] == 120.0 and [e["command"] for e in old["merged_from_runs"]] == ["dit-old", "flux"]
    new = module.merge([old, run("dit-new", "2026-01-03", {"dit": 90.0})])
    assert [e["command"] for e in new["merged_from_runs"]] == ["flux", "dit-new"]
    assert new["command"] == "flux && dit-new" and new["date"] == "2026-01-02" and new["wall_s"] == 110.0
    assert new["models"]["dit"]["run"]["command"] == "dit-new" and new["models"]["flux"]["run"]["command"] == "flux"
    assert new["machine"]["loadavg_at_start"] == ["2026-01-02"] and new["machine"]["loadavg_at_end"] == ["2026-01-03"]


def test_quality_at_scale_merge_keeps_presets_of_a_reproduced_baseline():
    """benchmarks/quality_at_scale.py: a run adding presets to a model whose baseline it
    reproduced keeps the earlier presets; a model whose baseline changed is replaced whole; every
    row names its run, and `runs` lists only runs some row comes from."""
    merge_runs = _benchmark_script("quality_at_scale").merge_runs

    def result(date, models):
        return {"runs": [{"command": f"cmd {date}", "date": date}], "samples": 200, "fd_real_train_vs_heldout": 30.0,
                "models": {m: {p: {"class_accuracy": acc, "ffd": ffd, "run": date} for p, (acc, ffd) in rows.items()}
                           for m, rows in models.items()}}

    old = result("d1", {"dit": {"baseline": (0.9, 100.0), "balanced": (0.91, 90.0)}, "flux": {"baseline": (1.0, 900.0)}})
    old = merge_runs(old, result("d2", {"flux": {"baseline": (1.0, 900.0), "balanced": (1.0, 901.0)}}))
    new = merge_runs(old, result("d3", {"dit": {"baseline": (0.9, 100.0), "lossless": (0.9, 99.0)}}))
    assert {p: r["run"] for p, r in new["models"]["dit"].items()} == {"baseline": "d3", "balanced": "d1", "lossless": "d3"}
    assert {p: r["run"] for p, r in new["models"]["flux"].items()} == {"baseline": "d2", "balanced": "d2"}
    assert [r["date"] for r in new["runs"]] == ["d1", "d2", "d3"]
    changed = merge_runs(new, result("d4", {"dit": {"baseline": (0.8, 120.0), "fast": (0.8, 110.0)}}))
    assert list(changed["models"]["dit"]) == ["baseline", "fast"]  # another baseline: old presets are not comparable
    assert [r["date"] for r in changed["runs"]] == ["d2", "d4"]
    other = result("d5", {"dit": {"baseline": (0.9, 100.0)}})
    other["samples"] = 100
    assert merge_runs(new, other) == other
