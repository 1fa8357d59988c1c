"""The report `ditopt optimize --report` and `ditopt export --report` write, and its Markdown
summary (`--markdown`, for a CI job summary or a pull-request comment).

The report is the optimization report (`OptimizationReport.to_dict()`: profile, passes with their
resolved configs, verification entries, environment, backend) with the conversion's own keys on
top; README.md, "The conversion report", documents every key. `schema_version` changes when a key
is renamed or removed (adding one does not).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

SCHEMA = "ditopt-conversion-report"
SCHEMA_VERSION = 1


def versions() -> dict[str, str | None]:
    """ditopt, torch, onnx and onnxruntime (None: not installed), and python."""
    import platform

    from ditopt import __version__

    out: dict[str, str | None] = {"ditopt": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnx", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def measure_cost(original: torch.nn.Module, optimized: Any, run: Callable[[Any], Any], what: str,
                 repeats: int) -> dict[str, Any]:
    """Multiply-adds and wall-clock seconds of `run(model)` with the original and the optimized
    model (timings interleaved so machine noise hits both; the median of `repeats`; 0 repeats:
    multiply-adds only). The optimized runtime is reset after every run."""
    from ditopt.costs import mac_counter

    def once(model: Any) -> None:
        with torch.inference_mode():
            run(model)
        if model is optimized:
            optimized.reset()

    macs = {}
    for key, model in (("original", original), ("optimized", optimized)):
        with mac_counter() as counted:
            once(model)
        macs[key] = counted()
    seconds: dict[str, list[float]] = {"original": [], "optimized": []}
    for _ in range(repeats):
        for key, model in (("original", original), ("optimized", optimized)):
            start = time.perf_counter()
            once(model)
            seconds[key].append(time.perf_counter() - start)
    cost: dict[str, Any] = {
        "measured_on": what,
        "macs": {**macs, "ratio": macs["original"] / max(macs["optimized"], 1)},
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "seconds": None,
        "speedup": None,
    }
    if repeats:
        median = {k: statistics.median(v) for k, v in seconds.items()}
        cost["seconds"] = median
        cost["speedup"] = median["original"] / max(median["optimized"], 1e-12)
    return cost


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float("inf") if value == "inf" else None


def quality(data: dict[str, Any]) -> dict[str, Any]:
    """Predicted (each searched pass's PSNR on the search's samples) and measured quality (each
    verification entry with the samples it was measured on), from an optimization report."""
    predicted = [{"pass": p["name"], "predicted_psnr_db": p["outcome"]["predicted_psnr_db"],
                  "target_psnr_db": p["outcome"].get("target_psnr_db")}
                 for p in data.get("passes", []) if p.get("applied") and (p.get("outcome") or {}).get("predicted_psnr_db") is not None]
    measured = []
    for v in data.get("verification", []):
        spread = next((d for d in v.get("details", []) if "samples" in d), {})
        measured.append({
            "kind": v.get("kind"),
            "passed": v.get("passed"),
            "gating": v.get("gating", True),
            "psnr_db": v.get("psnr_db"),
            "psnr_lower_db": v.get("psnr_lower_db"),
            "max_rel_err": v.get("max_rel_err"),
            "samples": spread.get("samples"),
            "samples_from": spread.get("samples_from") or next(
                (d[k] for d in v.get("details", []) for k in ("samples_from", "source") if k in d), None),
            "unverified": next((d["unverified"] for d in v.get("details", []) if "unverified" in d), None),
        })
    return {"predicted": predicted, "measured": measured}


def artifact_summary(path: Path) -> dict[str, Any]:
    """Where the artifact is, the sha256 of its manifest.json (which lists every other file's
    sha256 and size), its file count and bytes, and the artifact-vs-runtime check."""
    manifest_path = Path(path) / "manifest.json"
    raw = manifest_path.read_bytes()
    manifest = json.loads(raw)
    files = manifest.get("files", {})
    return {
        "path": str(path),
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "files": len(files) + 1,
        "bytes": sum(int(f.get("size", 0)) for f in files.values()) + len(raw),
        "segments": len(manifest.get("segments", [])),
        "verification": manifest.get("verification"),
    }


def build_report(command: str, model: str, optimized: Any, *, cost: dict[str, Any] | None = None,
                 artifact: dict[str, Any] | None = None, error: str | None = None,
                 out: Path | None = None) -> dict[str, Any]:
    """The versioned report of one `optimize` or `export` run. `passed`: the quality gate passed
    and (export) the artifact was written and verified; `gate.passed` is the quality gate alone."""
    from ditopt.optimize import describe_gate_failure

    data = optimized.report.to_dict()
    gate_passed = bool(data["passed"])
    passed = gate_passed and error is None and (command != "export" or artifact is not None)
    return {
        **data,
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "model": model,
        "passed": passed,
        "gate": {"passed": gate_passed, "budget": data["profile"].get("budget"),
                 "failure": describe_gate_failure(data)},
        "quality": quality(data),
        "cost": cost,
        "pass_configs": [{"name": p["name"], "applied": p["applied"], "modified": p["modified"],
                          "config": p["config"], "resolved": p["resolved"]} for p in data["passes"]],
        "artifact": artifact,
        "output": str(out) if out is not None else None,
        "error": error,
        "versions": versions(),
    }


def _db(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "-"
    return "inf" if number == float("inf") else f"{number:.2f} dB"


def markdown(report: dict[str, Any]) -> str:
    """A short summary: verdict, budget, quality, cost, passes, artifact, versions."""
    verdict = "passed" if report["passed"] else "FAILED"
    lines = [f"### ditopt {report['command']}: {report['model']} with `{report['profile'].get('name')}`: **{verdict}**", ""]
    if report.get("error"):
        lines += [f"Error: {report['error']}", ""]
    if report["gate"]["failure"]:
        lines += [report["gate"]["failure"], ""]
    budget = report["gate"]["budget"] or {}
    lines += ["| | |", "|---|---|",
              f"| quality gate | {'passed' if report['gate']['passed'] else 'FAILED'} |",
              "| budget | " + ", ".join(f"{k} = {v}" for k, v in budget.items() if v is not None) + " |"]
    for p in report["quality"]["predicted"]:
        lines.append(f"| predicted PSNR ({p['pass']}, search samples) | {_db(p['predicted_psnr_db'])} |")
    for m in report["quality"]["measured"]:
        if m["kind"] == "end-to-end":
            where = f"{m['samples']} samples" if m["samples"] else "no samples"
            text = (f"mean {_db(m['psnr_db'])}, lower bound {_db(m['psnr_lower_db'])} on {where}"
                    + (f" ({m['samples_from']})" if m["samples_from"] else "")
                    if not m["unverified"] else f"unverified: {m['unverified']}")
        else:
            err = _number(m["max_rel_err"])
            text = f"max relative error {err:.2e}" if err is not None else "max relative error -"
            text += "" if m["gating"] else " (not gating)"
        lines.append(f"| measured ({m['kind']}) | {text} |")
    cost = report.get("cost")
    if cost:
        macs = cost["macs"]
        lines.append(f"| multiply-adds ({cost['measured_on']}) | {macs['original'] / 1e9:.3f} G -> "
                     f"{macs['optimized'] / 1e9:.3f} G (ratio {macs['ratio']:.2f}) |")
        if cost["speedup"] is not None:
            lines.append(f"| wall-clock speedup | {cost['speedup']:.2f}x ({cost['threads']} threads, median of {cost['repeats']}) |")
    for p in report["pass_configs"]:
        state = "applied" if p["applied"] else "rolled back"
        config = json.dumps(p["resolved"], default=str)
        lines.append(f"| pass `{p['name']}` ({state}) | `{config if len(config) <= 160 else config[:157] + '...'}` |")
    art = report.get("artifact")
    if art:
        lines.append(f"| artifact | `{art['path']}`: {art['files']} files, {art['bytes'] / 1e6:.2f} MB, "
                     f"manifest sha256 `{art['manifest_sha256'][:16]}` |")
    elif report["command"] == "export":
        lines.append("| artifact | none written |")
    v = report["versions"]
    lines.append("| versions | " + ", ".join(f"{k} {v[k]}" for k in ("ditopt", "torch", "onnxruntime") if v.get(k)) + " |")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], json_path: Path | None, markdown_path: Path | None) -> None:
    """Both files atomically (a reader never sees half of one)."""
    from ditopt.io import atomic_write_text

    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2, default=str) + "\n")
    if markdown_path is not None:
        atomic_write_text(markdown_path, markdown(report))
