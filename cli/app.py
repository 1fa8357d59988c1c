"""The Typer applications and the error console, in their own module so that command modules
(cli/bench_models.py) register on them without importing the package that imports them."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Capture, optimize, verify and export Diffusion Transformers.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (speed and quality, side by side).")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)
