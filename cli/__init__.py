"""The `ditopt` command line (typer + rich).

Exit codes: 0 ok; 1 a quality gate failed; 2 bad input (unknown model, invalid profile,
unsupported architecture, existing artifact without --force, ...).

This package sits on top of the core, the passes, the kernels and export; the core never
imports it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ditopt.errors import DitoptError

from ditopt.cli.app import app, bench_app, console  # absolute: see kernels/__init__.py (a top-level `cli` import stays an alias)
EXIT_OK, EXIT_QUALITY, EXIT_BAD_INPUT = 0, 1, 2


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fail(exc: DitoptError) -> None:
    # The message as written (escaped: rich would take `ditopt[tensorrt]` for markup) on one line.
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _block_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"{summary['model_class']}  ({summary['parameters']:,} parameters, "
                  f"{summary['image_tokens']} image + {summary['text_tokens']} text tokens, grid {summary['grid']})")
    for col in ("#", "block", "type", "stream", "attention: kind q x k tokens, heads x dim", "FFN", "adaLN", "params"):
        table.add_column(col)
    for b in summary["blocks"]:
        attn = "; ".join(
            f"{a['kind']}: {a['query_tokens']}x{a['key_tokens']} ({a['image_tokens']} img + {a['text_tokens']} txt), {a['heads']}x{a['head_dim']}"
            for a in b["attention"]
        )
        ffn = ", ".join(f"{f['in_features']}->{f['hidden_features']} {f['activation']}" for f in b["ffn"])
        table.add_row(str(b["index"]), b["module"], b["type"], b["stream"], attn, ffn, "yes" if b["modulation"] else "-", f"{b['parameters']:,}")
    return table


@app.command()
def inspect(
    model: str = typer.Argument(..., help="built-in name or package.module:factory"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Show the recovered block structure of MODEL."""
    from ditopt import capture
    from ditopt.cli.models import resolve_model

    try:
        resolved = resolve_model(model)
        graph = capture(resolved.model, resolved.example_inputs)
    except DitoptError as exc:
        _fail(exc)
    summary = graph.summary()
    if as_json:
        _emit_json(summary)
    else:
        Console(width=200).print(_block_table(summary))


def _optimize(model: str, profile: str, calibrate: bool) -> tuple[Any, Any]:
    import ditopt
    from ditopt.cli.models import resolve_model

    resolved = resolve_model(model)
    calibration, validation = resolved.calibration, resolved.validation  # a factory's own sampling loop
    if calibrate and resolved.bundle is not None:  # trained zoo models calibrate on their own sampler
        calibration, validation = resolved.bundle.calibration_fn(), resolved.bundle.validation_fn()
    optimized = ditopt.optimize(resolved.model, profile, example_inputs=resolved.example_inputs,
                                calibration=calibration, validation=validation, on_gate_miss="return")
    return resolved, optimized


def _cost(resolved: Any, optimized: Any, repeats: int) -> dict[str, Any]:
    from ditopt.cli.conversion import measure_cost

    run, what = _verification_run(resolved, describe=True)
    return measure_cost(resolved.model, optimized, run, what, repeats)


@app.command()
def optimize(
    model: str = typer.Argument(..., help="built-in name or package.module:factory"),
    profile: str = typer.Option("identity", "--profile", "-p", help="preset name or TOML file"),
    report: Optional[Path] = typer.Option(None, "--report", help="also write the JSON report here (schema: README, "
                                          "'The conversion report')"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="also write a short Markdown summary here (a CI job "
                                            "summary or pull-request comment)"),
    timing_repeats: int = typer.Option(3, "--timing-repeats", min=0, help="with --report/--markdown: timed runs per model "
                                       "for the speedup (0: multiply-adds only)"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON report"),
) -> None:
    """Optimize MODEL with a profile and verify it; exit 1 when the quality gate fails."""
    try:
        resolved, optimized = _optimize(model, profile, calibrate=True)
        if report is not None or markdown is not None:
            from ditopt.cli import conversion

            conversion.write(conversion.build_report("optimize", model, optimized,
                                                     cost=_cost(resolved, optimized, timing_repeats)), report, markdown)
    except DitoptError as exc:
        _fail(exc)
    data = optimized.report.to_dict()
    if report is not None:
        for title, path in write_report_figures(getattr(optimized, "stats", None), report, data):
            if not as_json:
                console.print(f"{title}: {path}")
    if as_json:
        _emit_json(data)
    else:
        _print_report(data)
    if not data["passed"]:
        from ditopt.optimize import describe_gate_failure

        console.print(f"[bold red]{describe_gate_failure(data)}[/]")
        raise typer.Exit(EXIT_QUALITY)


def write_report_figures(stats: Any, report: Path, data: dict[str, Any]) -> list[tuple[str, Path]]:
    """Next to a report, every figure a pass family registered (`register_report_figure`) that the
    calibration holds something for, as REPORT<suffix> (the attention family's REPORT.attention.png:
    what a user checks before trusting a substitution): (title, path) per figure written."""
    from ditopt.registry import report_figures

    if stats is None:
        return []
    written = []
    for figure in report_figures().values():
        path = figure.draw(stats, data, report.with_suffix(figure.suffix))
        if path is not None:
            written.append((figure.title, Path(path)))
    return written


def _print_report(data: dict[str, Any]) -> None:
    from ditopt.optimize import describe_retry

    out = Console()
    out.print(f"[bold]{data['model_class']}[/] with profile [bold]{data['profile']['name']}[/] (graph {data['graph_hash']})")
    for p in data["passes"]:
        state = "applied" if p["applied"] else "ROLLED BACK"
        out.print(f"  pass {p['name']}: {state}; {json.dumps(p['report'], default=str)[:300]}")
    for attempt in data.get("retries", []):
        out.print(f"  {describe_retry(attempt)}")
    for v in data["verification"]:
        out.print(f"  verification ({v['kind']}): passed={v['passed']} max_rel_err={v.get('max_rel_err')} psnr_db={v.get('psnr_db')}")


@app.command()
def export(
    model: str = typer.Argument(..., help="built-in name or package.module:factory"),
    out: Path = typer.Argument(..., help="artifact directory to create"),
    profile: str = typer.Option("identity", "--profile", "-p"),
    force: bool = typer.Option(False, "--force", help="replace an existing artifact"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="before moving the artifact into place, run it beside the "
                                "PyTorch runtime (zoo models: a sampling run at the exported batch; others: one call) and "
                                "refuse to write it if they differ"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the JSON conversion report here, also when the "
                                          "quality gate fails (schema: README, 'The conversion report')"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="write a short Markdown summary here (e.g. "
                                            "$GITHUB_STEP_SUMMARY or a pull-request comment)"),
    timing_repeats: int = typer.Option(3, "--timing-repeats", min=0, help="with --report/--markdown: timed runs per model "
                                       "for the speedup (0: multiply-adds only)"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest"),
    engine: str = typer.Option("onnx", "--engine", help="onnx: the artifact for onnxruntime; tensorrt: also one TensorRT "
                               "engine per segment in OUT.tensorrt (needs tensorrt and a CUDA device; exits 2 writing "
                               "nothing where either is missing)"),
    precision: str = typer.Option("fp16", "--precision", help="TensorRT engines: fp32, tf32, fp16, bf16, int8 or fp8"),
) -> None:
    """Optimize MODEL, check the quality gate, and only then write an artifact (one ONNX file per
    segment plus manifest.json). Exit 0: artifact written and verified; 1: the quality gate
    failed (the report is written, nothing is written at OUT); 2: bad input."""
    from ditopt.cli import conversion
    from ditopt.export import export_artifact

    wants_report = report is not None or markdown is not None
    try:
        if engine not in ("onnx", "tensorrt"):
            raise DitoptError(f"--engine {engine}: use onnx or tensorrt")
        if engine == "tensorrt":
            from ditopt.export.tensorrt import PRECISIONS, require_tensorrt

            if precision not in PRECISIONS:
                raise DitoptError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
            require_tensorrt()  # before anything is written: names what is missing and how to install it
        if (out.exists() or out.is_symlink()) and not force:  # before minutes of optimizing, not after
            raise DitoptError(f"{out} already exists; pass --force to replace an artifact ditopt wrote, or choose another OUT")
        for written in (report, markdown):
            if written is not None and Path(written).resolve().is_relative_to(out.resolve()):
                raise DitoptError(f"{written} is inside the artifact directory {out}; write the report elsewhere")
        resolved, optimized = _optimize(model, profile, calibrate=True)
    except DitoptError as exc:
        _fail(exc)
    cost = None
    try:
        if not optimized.report.passed:  # the gate decides before anything is written at OUT
            if wants_report:
                conversion.write(conversion.build_report("export", model, optimized, out=out), report, markdown)
            from ditopt.optimize import describe_gate_failure

            console.print(f"[bold red]{escape(describe_gate_failure(optimized.report.to_dict()) or '')}[/] "
                          f"Nothing was written at {escape(str(out))}.", soft_wrap=True)
            raise typer.Exit(EXIT_QUALITY)
        if wants_report:
            cost = _cost(resolved, optimized, timing_repeats)
        check = _verification_run(resolved) if verify else None
        path = export_artifact(optimized, out, example_inputs=resolved.example_inputs, force=force, verify_with=check)
        if engine == "tensorrt":
            from ditopt.export.tensorrt import build_engines

            Console().print(f"wrote TensorRT engines to {build_engines(path, precision=precision)}")
        if wants_report:
            conversion.write(conversion.build_report("export", model, optimized, cost=cost, out=out,
                                                     artifact=conversion.artifact_summary(path)), report, markdown)
    except DitoptError as exc:
        if wants_report:  # the pipeline shows why (export_artifact wrote nothing at OUT)
            conversion.write(conversion.build_report("export", model, optimized, cost=cost, out=out, error=str(exc)),
                             report, markdown)
        _fail(exc)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    if as_json:
        _emit_json(manifest)
    else:
        checked = manifest.get("verification")
        Console().print(f"wrote {path} ({len(manifest.get('segments', []))} segments)"
                        + (f"; matches the PyTorch runtime to {checked['max_rel_err']:.1e} (relative)" if checked else ""))
        for note in manifest.get("notes", []):
            if isinstance(note, str) and note.startswith("conditional-only"):  # how the artifact runs those steps
                Console().print(f"note: {note}")


def _verification_run(resolved: Any, describe: bool = False) -> Any:
    """What `export --verify` runs through the runtime and the artifact: for a zoo model, its
    sampler over a whole generation at the exported batch (every cached step of the plan runs);
    otherwise one call with the example inputs. With `describe`, also a line saying which."""
    if resolved.example_inputs is None:  # what optimize captured the exported program with
        from ditopt.inputs import synthesize_inputs

        inputs = synthesize_inputs(resolved.model)
    else:
        inputs = dict(resolved.example_inputs)
    if resolved.bundle is not None:
        rows = next(v.shape[0] for v in inputs.values() if hasattr(v, "shape") and v.dim() > 0)
        n = max(rows // 2, 1)  # CFG rows: unconditional and conditional per sample
        run = lambda m: resolved.bundle.sample(list(range(n)), [910000 + i for i in range(n)], model=m)  # noqa: E731
        what = f"one generation of {n} sample{'s' if n > 1 else ''}, {resolved.bundle.default_steps} steps"
    else:
        run, what = (lambda m: m(**inputs)), "one denoiser call with the example inputs"
    return (run, what) if describe else run


@bench_app.command("attention")
def bench_attention_cmd(
    grid: tuple[int, int] = typer.Option((64, 64), "--grid", help="token grid H W"),
    heads: int = typer.Option(4, "--heads", min=1),
    head_dim: int = typer.Option(64, "--head-dim", min=1),
    tile: int = typer.Option(8, "--tile", min=1),
    radius: int = typer.Option(1, "--radius", min=0, help="neighbourhood radius in tiles"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the result here"),
) -> None:
    """Time the CPU neighbourhood attention against dense SDPA on the same inputs."""
    from ditopt.kernels.bench import bench_attention

    if min(grid) < 1:
        raise typer.BadParameter(f"the grid is H W tokens, both >= 1; got {grid[0]} {grid[1]}", param_hint="--grid")

    result = bench_attention(grid=tuple(grid), heads=heads, head_dim=head_dim, tile=tile, radius=radius)
    if json_path is not None:
        from ditopt.io import atomic_write_text

        atomic_write_text(json_path, json.dumps(result, indent=2))
    _emit_json(result)


from ditopt.cli.demo import demo  # noqa: E402

app.command()(demo)


def main() -> None:
    try:
        app()
    except DitoptError as exc:  # anything a command did not catch itself
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(exc.exit_code)

from ditopt.cli import bench_models  # noqa: E402,F401  (registers `ditopt bench models`)
