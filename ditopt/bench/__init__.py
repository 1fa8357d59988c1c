"""ditopt's benchmark library: ditopt's passes against peer caching methods on the trained zoo
models, with wall-clock, MACs, peak memory and quality measured in one interleaved run.

    from ditopt.bench import run_models
    result = run_models(["dit-digits"], ["diffusers-fbc", "ditopt-taylor"], out_dir="benchmarks/results")

Entry points: ``ditopt bench models`` (CLI) and ``benchmarks/run_models.py``.
"""

from .methods import METHODS, MethodSetting, Runner, Unsupported, method_names, settings_for
from .report import markdown_report, markdown_table, pareto_plot
from .runner import DEFAULT_METHODS, SCHEMA, run_models, write_outputs

__all__ = [
    "DEFAULT_METHODS", "METHODS", "MethodSetting", "Runner", "SCHEMA", "Unsupported", "markdown_report",
    "markdown_table", "method_names", "pareto_plot", "run_models", "settings_for", "write_outputs",
]
