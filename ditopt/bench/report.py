"""Markdown tables and the Pareto plot (speedup vs PSNR) from a model-benchmark result dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "markdown_report", "pareto_plot", "TABLE_COLUMNS"]

TABLE_COLUMNS = ("method", "setting", "status", "s/sample (median)", "speedup", "GMACs/sample", "MACs vs ref",
                 "peak alloc MiB", "PSNR dB", "SSIM", "class acc", "FFD")


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _psnr_cell(row: dict[str, Any]) -> str:
    q = row.get("quality") or {}
    if not q:
        return "-"
    if q.get("psnr_db") is None:
        return "inf (identical)" if q.get("identical_to_reference") else "inf"
    return f"{q['psnr_db']:.2f}"


def markdown_table(model: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in model["results"]:
        q = r.get("quality") or {}
        t = r.get("timing") or {}
        macs = r.get("macs_per_sample")
        status = r["status"] + (", gate missed" if gate_missed(r) else "")
        lines.append("| " + " | ".join([
            r["method"], r["setting"], status,
            _f(t.get("median_s_per_sample"), ".3f"),
            _f(r.get("speedup"), ".2f") + ("x" if r.get("speedup") is not None else ""),
            _f(None if macs is None else macs / 1e9, ".2f"),
            _f(r.get("mac_ratio"), ".3f"),
            _f(r.get("peak_alloc_mib"), ".1f"),
            _psnr_cell(r),
            _f(q.get("ssim"), ".4f"),
            _f(q.get("class_accuracy"), ".3f"),
            _f(q.get("ffd"), ".2f"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def gate_missed(row: dict[str, Any]) -> bool:
    """A ditopt row whose held-out budget gate still failed after optimize's retries (the
    library raises QualityGateError, the CLI exits 1; the benchmark asks for the flagged model)."""
    return (row.get("info") or {}).get("passed") is False


def gate_note(row: dict[str, Any]) -> str:
    e2e = [v for v in (row.get("info") or {}).get("verification", []) if v.get("kind") == "end-to-end"]
    bound = e2e[-1].get("psnr_lower_db") if e2e else None
    profile = (row.get("info") or {}).get("profile")
    budget = (f"{profile.get('budget', {}).get('min_psnr_db')} dB" if isinstance(profile, dict)
              else f"the `{profile}` preset's")
    return (f"- `{row['key']}`: held-out gate **missed** after optimize's retries (lower bound "
            f"{bound if bound is None else round(bound, 2)} dB, budget {budget}): optimize would raise QualityGateError and the CLI exit 1; "
            "the benchmark asked for the flagged model (on_gate_miss='return'), and the row shows what it measured")


def row_notes(model: dict[str, Any]) -> list[str]:
    """Why a row is not a plain measured result: not effective, unsupported, failed, or its gate missed."""
    notes = []
    for r in model["results"]:
        if r["status"] in ("no effect", "unsupported", "failed"):
            notes.append(f"- `{r['key']}`: **{r['status']}** - {r.get('reason')}")
        elif gate_missed(r):
            notes.append(gate_note(r))
    return notes


def markdown_report(result: dict[str, Any]) -> str:
    m = result["machine"]
    c = result["config"]
    out = [f"# Model benchmark ({'complete' if result.get('complete') else 'PARTIAL'})", "",
           f"- command: `{result['command']}`",
           f"- date: {result['date']}",
           f"- machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, torch threads {m['torch_threads']}, "
           f"torch {m['torch']}, diffusers {m['diffusers']}, cache-dit {m['cache_dit']}",
           f"- quality samples {c['samples']}, timed batch {c['batch']}, {c['repeats']} timed repeats (median), "
           f"quick={c['quick']}", ""]
    for name, model in result["models"].items():
        out += [f"## {name} ({model['model_class']}, {model['steps']} steps, CFG {model['guidance_scale']})", "",
                markdown_table(model)]
        notes = row_notes(model)
        if notes:
            out += ["", *notes, ""]
    return "\n".join(out) + "\n"


def pareto_plot(result: dict[str, Any], path: str | Path) -> Path:
    from ditopt.errors import require_extra

    matplotlib = require_extra("matplotlib", "plots", "the benchmark's Pareto plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"].items())
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(7.5 * max(1, len(models)), 5.5), squeeze=False)
    for ax, (name, model) in zip(axes[0], models):
        rows = [r for r in model["results"] if r.get("speedup") is not None and r.get("quality")]
        finite = [r["quality"]["psnr_db"] for r in rows if r["quality"].get("psnr_db") is not None]
        inf_x = (max(finite) + 5.0) if finite else 60.0
        families: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            families.setdefault(r["family"], []).append(r)
        for fam, rs in families.items():
            pts = sorted(((r["quality"]["psnr_db"] if r["quality"].get("psnr_db") is not None else inf_x,
                           r["speedup"], r) for r in rs), key=lambda p: p[0])
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            if fam == "baseline":
                ax.scatter(xs, ys, marker="*", s=160, color="black", zorder=5, label="reference (PSNR inf)")
                continue
            line, = ax.plot(xs, ys, marker="o", label=fam)
            for x, y, r in pts:
                if r["status"] != "ok":
                    ax.scatter([x], [y], s=120, facecolors="none", edgecolors="red", zorder=6)
                ax.annotate(r["setting"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points",
                            color=line.get_color())
        ax.axvline(inf_x, color="grey", lw=0.5, ls=":")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(f"{name} ({model['steps']} steps)")
        ax.set_xlabel("PSNR vs unoptimized model, dB (right edge: identical)")
        ax.set_ylabel("speedup (median wall-clock per sample)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("speedup vs fidelity; red ring = no effect (MACs did not drop)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
