"""`ditopt bench models`: ditopt's passes against peer caching methods on the trained zoo models
(wall-clock, MACs, peak memory, quality), interleaved in one run. See ditopt.bench."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ditopt.cli.app import bench_app, console


@bench_app.command("models")
def bench_models_cmd(
    model: List[str] = typer.Option(["dit-digits", "flux-digits"], "--model", "-m", help="zoo model (repeatable)"),
    method: Optional[List[str]] = typer.Option(None, "--methods", "--method",
                                               help="method to compare (repeatable; default: all). Known: "
                                                    "baseline, diffusers-fbc, diffusers-taylorseer, diffusers-magcache, "
                                                    "diffusers-pab, diffusers-fastercache, cachedit-dbcache, "
                                                    "cachedit-dbcache-taylorseer, ditopt-preset, ditopt-taylor, ditopt-residual"),
    samples: int = typer.Option(32, "--samples", min=1, help="quality samples per setting (held-out seeds, classes cycling 0..9)"),
    repeats: int = typer.Option(5, "--repeats", min=1, help="timed generations per setting (median reported)"),
    batch: int = typer.Option(4, "--batch", min=1, help="samples per generation (timed batch)"),
    threads: int = typer.Option(2, "--threads", min=1, help="torch.set_num_threads for the whole run"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="sampling steps (default: the model's; --quick: 8)"),
    calibration_samples: Optional[int] = typer.Option(None, "--calibration-samples", min=1,
                                                      help="calibration samples for ditopt presets and MagCache ratios (default 8; --quick 2)"),
    validation_samples: Optional[int] = typer.Option(None, "--validation-samples", min=1,
                                                     help="held-out samples the ditopt budget gate is checked on (default 16; --quick 2)"),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="output directory"),
    quick: bool = typer.Option(False, "--quick", help="one setting per method and few steps (smoke test)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    merge: bool = typer.Option(False, "--merge", help="keep other models already in OUT/models.json"),
    setting_index: Optional[int] = typer.Option(None, "--setting-index", min=0,
                                                help="run only this setting of every method (0 = gentlest)"),
    only: Optional[List[str]] = typer.Option(None, "--only",
                                             help="run only this setting, named as in the tables, e.g. 'ditopt-preset[balanced]' (repeatable)"),
) -> None:
    """Benchmark caching methods on the zoo models; writes models.json, models.md and models_pareto.png."""
    from ditopt.bench import method_names, run_models, settings_for

    from ditopt import zoo

    unknown = [m for m in model if m not in zoo.available()]
    if unknown:
        console.print(f"[bold red]error:[/] unknown zoo model {unknown[0]!r}; available: {', '.join(zoo.available())}")
        raise typer.Exit(2)
    methods = list(method) if method else None
    try:
        if methods or only:
            settings_for(methods or method_names(), only=list(only) if only else None)
    except ValueError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2)
    command = "ditopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_models(list(model), methods, samples=samples, repeats=repeats, batch=batch, threads=threads,
                        quick=quick, steps=steps, calibration_samples=calibration_samples,
                        validation_samples=validation_samples, out_dir=out, command=command, progress=progress,
                        merge=merge, setting_index=setting_index, only=list(only) if only else None)
    from ditopt.bench import markdown_table

    for name in model:
        res = result["models"][name]
        typer.echo(f"## {name} ({res['steps']} steps)\n")
        typer.echo(markdown_table(res))
    typer.echo(f"wrote {out / 'models.json'}, {out / 'models.md'}, {out / 'models_pareto.png'}")
