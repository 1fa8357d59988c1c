"""`ditopt demo`: the main job. Optimize a shipped, trained model with a budget preset
(calibrating on the spot), print the report, and save original vs optimized samples side by side."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ditopt.errors import DitoptError, MissingExtraError
from ditopt.optimize import describe_retry, format_db

from ditopt.zoo import VALIDATION_CLASSES as VAL_CLASSES, VALIDATION_SEEDS as VAL_SEEDS


class _CountingModel(torch.nn.Module):
    """Advances a progress bar on every denoiser call (calibration and search runs)."""

    def __init__(self, inner: torch.nn.Module, advance) -> None:
        super().__init__()
        self.inner, self.advance = inner, advance

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.advance()
        return self.inner(*args, **kwargs)


def macs_of(fn) -> int:
    # The benchmark's counter: plain FlopCounterMode has no formula for the CPU flash-attention
    # op and would count attention as free (the demo then reported 40.4 G per sample vs 53.8 G).
    from ditopt.bench.measure import mac_counter

    with mac_counter() as macs:
        fn()
    return macs()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def save_grid(original: torch.Tensor, optimized: torch.Tensor, path: Path, title: str) -> None:
    from ditopt.errors import require_extra

    matplotlib = require_extra("matplotlib", "plots", "the demo's sample grid")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = original.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.8))
    for row, (images, label) in enumerate(((original, "original"), (optimized, "optimized"))):
        for i in range(n):
            ax = axes[row, i]
            ax.imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def demo(
    model: str = typer.Option("dit-digits", "--model", "-m", help="zoo model: dit-digits, flux-digits, dit-digits-p1 or dit-canvas"),
    profile: str = typer.Option("balanced", "--profile", "-p", help="preset name or TOML file"),
    out: Path = typer.Option(Path("out/demo"), "--out", help="folder for report.json and the image grid"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="timed generations per model (median)"),
    threads: int = typer.Option(2, "--threads", min=1),
) -> None:
    """Optimize a trained zoo model with a budget preset and show what it bought."""
    import ditopt
    from ditopt import zoo
    from ditopt.io import atomic_write_text
    from ditopt.metrics import psnr, ssim

    torch.set_num_threads(threads)
    console = Console()
    try:
        bundle = zoo.load(model)
        ditopt.load_profile(profile)  # a bad profile is reported before minutes of calibration, not after
    except DitoptError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(exc.exit_code)
    out.mkdir(parents=True, exist_ok=True)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("calibrating + searching (denoiser calls)", total=None)

        # The zoo's own calibration / held-out samplers, on a model that advances the bar per call.
        calibrate, validate = bundle.calibration_fn(), bundle.validation_fn()

        def calibration(m: torch.nn.Module) -> torch.Tensor:
            return calibrate(_CountingModel(m, lambda: bar.advance(task)))

        def validation(m: torch.nn.Module) -> torch.Tensor:
            return validate(_CountingModel(m, lambda: bar.advance(task)))

        try:
            optimized = ditopt.optimize(
                bundle.model, profile, example_inputs=bundle.make_inputs(2), calibration=calibration, validation=validation,
                on_gate_miss="return",  # the table and grid are written either way; the exit code says
            )
        except DitoptError as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(exc.exit_code)

    with torch.inference_mode():
        reference = bundle.sample(VAL_CLASSES, VAL_SEEDS)
        optimized.reset()
        samples = bundle.sample(VAL_CLASSES, VAL_SEEDS, model=optimized)
        one = ([VAL_CLASSES[0]], [VAL_SEEDS[0]])
        macs_orig = macs_of(lambda: bundle.sample(*one))
        macs_opt = macs_of(lambda: bundle.sample(*one, model=optimized))
        # Interleaved timing: original and optimized alternate so machine noise hits both.
        t_orig, t_opt = [], []
        for _ in range(repeats):
            t_orig.append(median_time(lambda: bundle.sample(VAL_CLASSES[:4], VAL_SEEDS[:4]), 1))
            t_opt.append(median_time(lambda: bundle.sample(VAL_CLASSES[:4], VAL_SEEDS[:4], model=optimized), 1))
    speedup = statistics.median(t_orig) / statistics.median(t_opt)
    report = optimized.report.to_dict()
    e2e = next((v for v in report["verification"] if v["kind"] == "end-to-end"), {})
    chosen = report["passes"][0]["report"] if report["passes"] else {}
    summary = {
        "model": model,
        "profile": profile,
        "passed": report["passed"],
        "predicted_psnr_db": chosen.get("predicted_psnr_db"),
        "measured_psnr_db_heldout": psnr(samples, reference),
        "ssim_heldout": ssim(samples, reference),
        "speedup_wall_clock": speedup,
        "seconds_per_4_samples": {"original": statistics.median(t_orig), "optimized": statistics.median(t_opt)},
        "macs_per_sample": {"original": macs_orig, "optimized": macs_opt, "ratio": macs_orig / max(macs_opt, 1)},
        "threads": threads,
    }
    atomic_write_text(out / "report.json", json.dumps({"summary": summary, "report": report}, indent=2, default=str))
    grid = out / f"{model}-{Path(profile).stem}.png"
    try:
        save_grid(reference, samples, grid, f"{model}: original (top) vs {profile} (bottom), PSNR {summary['measured_psnr_db_heldout']:.1f} dB, {speedup:.2f}x")
    except MissingExtraError as exc:  # the numbers stand without the picture
        console.print(f"[yellow]no sample grid: {exc}[/yellow]")

    table = Table(title=f"{model} with profile {profile}")
    table.add_column("what")
    table.add_column("value")
    for p in report["passes"]:
        stages = p["report"].get("stages", [])
        desc = "; ".join(
            f"{s.get('policy')}, " + ("fitted forecast" if s.get("forecast") == "fitted" else f"Taylor order {s.get('order')}")
            + f", computes {len(s.get('compute_steps', []))}/{s.get('steps')} steps"
            + (f" ({len(s['cond_only_steps'])} conditional-only)" if s.get("cond_only_steps") else "")
            for s in stages
        )
        desc = desc or p["report"].get("summary") or p["report"].get("reason") or ""
        status = "rolled back: " if not p["applied"] else "applied: " if p["modified"] else "no change: "
        table.add_row(f"pass {p['name']}", status + desc)
    for attempt in report.get("retries", []):
        table.add_row("retry", describe_retry(attempt))
    table.add_row("PSNR predicted (calibration seeds)", format_db(summary["predicted_psnr_db"]))
    bound = (e2e.get("details") or [{}])[0]
    table.add_row("PSNR measured (held-out seeds)", f"{format_db(summary['measured_psnr_db_heldout'])} "
                  f"(end-to-end check on {bound.get('samples', '?')} seeds: mean {format_db(e2e.get('psnr_db'))}, "
                  f"{e2e.get('budget', {}).get('confidence', 0.5):.0%} lower bound {format_db(e2e.get('psnr_lower_db'))})")
    table.add_row("SSIM (held-out)", f"{summary['ssim_heldout']:.4f}")
    table.add_row("wall-clock speedup", f"{speedup:.2f}x ({threads} threads, median of {repeats})")
    table.add_row("MACs per sample", f"{macs_orig/1e9:.2f} G -> {macs_opt/1e9:.2f} G ({summary['macs_per_sample']['ratio']:.2f}x fewer)")
    table.add_row("quality gate", "passed" if report["passed"] else "FAILED")
    table.add_row("written", f"{out / 'report.json'}, {grid}")
    console.print(table)
    if not report["passed"]:
        from ditopt.optimize import describe_gate_failure

        console.print(f"[bold red]{describe_gate_failure(report)}[/]")
        raise typer.Exit(1)
