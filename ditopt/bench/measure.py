"""Measurements: multiply-accumulates, peak allocator memory, machine description.

* MACs: :func:`ditopt.costs.mac_counter` over whole sampling runs (FlopCounterMode with the CPU
  flash-attention formula PyTorch lacks; matmuls, convolutions and attention only).
* Peak memory: the CPU allocator's live bytes during one generation, from PyTorch's profiler with
  ``profile_memory=True`` (every allocation/free the CPU allocator sees, "Total Allocated" in the
  trace), reported as the peak above the level at the start of the generation. It covers
  activations and whatever a cache keeps alive across steps; weights and anything allocated
  before the generation (the model copies) are not in it. Process max RSS is recorded as well,
  but it is a high-water mark of the whole process and cannot be attributed to one method.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
from typing import Any, Callable

import torch

from ditopt.costs import mac_counter

__all__ = ["mac_counter", "peak_allocated_bytes", "machine_info", "max_rss_mib"]


def peak_allocated_bytes(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``fn`` under the profiler and return (its result, peak bytes the CPU allocator held above
    the level at the start), or None for the peak when the trace had no memory events."""
    import torch.profiler as tp

    with tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    events = sorted((e for e in trace.get("traceEvents", []) if e.get("name") == "[memory]"),
                    key=lambda e: e.get("ts", 0))
    if not events:
        return result, None
    live = peak = 0
    for e in events:
        live += int(e.get("args", {}).get("Bytes", 0))
        peak = max(peak, live)
    return result, peak


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def script_run_record(script: str, argv: list[str] | None, threads: int) -> dict[str, Any]:
    """What a benchmark script records of its run when it ends: the command as typed (from the
    repository root), the UTC date, the load average then, and the machine."""
    import shlex
    import sys
    from datetime import datetime, timezone

    args = argv if argv is not None else sys.argv[1:]
    return {
        "command": f"python {script} " + " ".join(shlex.quote(a) for a in args),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_end": list(os.getloadavg()),
        "machine": machine_info(threads),
    }


def machine_info(threads: int) -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch_get_num_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "cache_dit": _version("cache-dit"),
        "ditopt": _version("ditopt"),
        "loadavg_at_start": list(load) if load else None,
    }
