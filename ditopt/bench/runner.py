"""The model benchmark: every method setting against the unoptimized zoo model, in one process.

Phases per model (all settings of a phase run before the next phase starts):

1. build: apply each setting to its own deep copy of the model (ditopt: ``optimize``, with
   calibration on calibration seeds and validation on validation seeds, both disjoint from the
   evaluation seeds); the program for the benchmark batch shape is captured here.
2. quality: ``samples`` images on held-out (class, seed) pairs, classes cycling 0..9, generated
   in generations of ``batch`` samples (the timed batch size, so probe-gated caches see the same
   batches as in timing), every generation with fresh cache state. MACs are counted over this
   whole sampling run. PSNR/SSIM against the reference model's images for the same pairs, class
   accuracy with the shipped classifier, feature Fréchet distance to the held-out real digits.
3. timing: one untimed warm-up generation per setting (also the peak-memory measurement), then
   ``repeats`` rounds; each round times one generation of ``batch`` samples for every setting,
   round-robin, starting one setting later each round, so machine noise hits all settings alike.
   Reported: median seconds per sample.

A peer setting whose MACs do not drop below the reference is marked ``no effect``. A setting
declared exact (``exact=True``: the conditioning memo, the patch layout) is marked ``exact`` when its samples equal
the reference's bit for bit, ``failed`` otherwise; it is timed but not on the Pareto curve.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from .measure import machine_info, mac_counter, max_rss_mib, peak_allocated_bytes
from .methods import BuildContext, Runner, Unsupported, method_names, settings_for

__all__ = ["run_models", "DEFAULT_METHODS", "SCHEMA"]

SCHEMA = "ditopt.bench.models/1"
DEFAULT_METHODS = method_names()
EVAL_SEED0, CAL_SEED0, VAL_SEED0 = 100_000, 200_000, 300_000
QUICK_STEPS = 8


def _finite_or_none(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(x)


class _Progress:
    """rich progress bar on stderr (or nothing)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._p = None
        self._plain: dict[Any, list] = {}  # not a terminal (nohup ... > log): one line per step
        self._t0 = time.perf_counter()

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            if console.is_terminal:
                self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TimeElapsedColumn(), console=console, transient=False)
                self._p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def task(self, description: str, total: int) -> Any:
        if self._p is not None:
            return self._p.add_task(description, total=total)
        if self.enabled:
            key = len(self._plain)
            self._plain[key] = [0, total]
            return key
        return None

    def advance(self, task: Any, description: str | None = None) -> None:
        if self._p is not None and task is not None:
            self._p.update(task, advance=1, **({"description": description} if description else {}))
        elif task is not None and task in self._plain:
            done = self._plain[task]
            done[0] += 1
            print(f"[{time.perf_counter() - self._t0:7.1f}s] {done[0]}/{done[1]} {description or ''}",
                  file=sys.stderr, flush=True)

    def log(self, msg: str) -> None:
        if self._p is not None:
            self._p.console.print(msg)


def _chunks(xs: list[int], n: int) -> list[list[int]]:
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def _bench_model(name: str, methods: list[str], *, samples: int, repeats: int, batch: int, quick: bool,
                 steps: int | None, calibration_samples: int, validation_samples: int, progress: _Progress,
                 setting_index: int | None = None, only: list[str] | None = None,
                 checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    from ditopt import metrics, zoo

    t_model = time.perf_counter()
    bundle = zoo.load(name)
    steps = int(steps or (min(QUICK_STEPS, bundle.default_steps) if quick else bundle.default_steps))
    classes = [i % bundle.num_classes for i in range(samples)]
    seeds = [EVAL_SEED0 + i for i in range(samples)]
    ncal, nval = calibration_samples, validation_samples
    ctx = BuildContext(bundle=bundle, steps=steps,
                       calibration_classes=[i % 10 for i in range(ncal)], calibration_seeds=[CAL_SEED0 + i for i in range(ncal)],
                       validation_classes=[(i + 5) % 10 for i in range(nval)], validation_seeds=[VAL_SEED0 + i for i in range(nval)])
    ctx.cache["batch"] = batch
    settings = settings_for(methods, quick=quick, setting_index=setting_index, only=only)
    meta = bundle.meta or {}
    out: dict[str, Any] = {
        "model": name,
        "model_class": type(bundle.model).__name__,
        "parameters": sum(p.numel() for p in bundle.model.parameters()),
        "steps": steps,
        "guidance_scale": bundle.default_guidance_scale,
        "weights": {"kind": meta.get("weights"),
                    **{k: (meta.get("training") or {}).get(k) for k in ("iters_done", "iters_planned", "final_loss_avg100")}},
        "quality_samples": samples,
        "classes": classes,
        "seeds": seeds,
        "calibration_seeds": ctx.calibration_seeds,
        "validation_seeds": ctx.validation_seeds,
        "results": [],
    }
    rows: list[dict[str, Any]] = []
    runners: dict[str, Runner] = {}

    # -- 1. build ------------------------------------------------------------------------------
    task = progress.task(f"{name}: build", len(settings))
    for s in settings:
        row: dict[str, Any] = {"method": s.method, "family": s.family, "provider": s.provider, "setting": s.setting,
                               "key": s.key, "params": _jsonable(s.params), "status": "pending", "reason": None}
        t0 = time.perf_counter()
        try:
            runner = s.build(ctx, s.params)
            runners[s.key] = runner
            row["info"] = _jsonable(runner.info)
        except Unsupported as exc:
            row["status"], row["reason"] = "unsupported", str(exc)
        except Exception as exc:  # a peer that breaks is reported, not hidden
            row["status"], row["reason"] = "failed", f"build: {type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=6)
        row["build_s"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        progress.advance(task, f"{name}: build {s.key}")

    # -- 2. quality + MACs ---------------------------------------------------------------------
    clf = zoo.load_classifier()
    real, _ = zoo.heldout_digits()
    reference: torch.Tensor | None = None
    active = [r for r in rows if r["key"] in runners]
    task = progress.task(f"{name}: quality", len(active))
    for row in active:
        runner = runners[row["key"]]
        try:
            imgs = []
            with mac_counter() as macs:
                for cl, sd in zip(_chunks(classes, batch), _chunks(seeds, batch)):
                    imgs.append(ctx.sample(runner, cl, sd))
                total_macs = macs()
            images = torch.cat(imgs, 0)
            if not torch.isfinite(images).all():
                raise FloatingPointError("non-finite samples")
            if row["method"] == "baseline":
                reference = images
            q: dict[str, Any] = {"identical_to_reference": bool(torch.equal(images, reference))}
            cells, cell_classes = zoo.classifier_view(images, classes)  # canvases: their 16 digits
            for key, fn in (("psnr_db", lambda: _finite_or_none(metrics.psnr(images, reference))),
                            ("ssim", lambda: metrics.ssim(images, reference)),
                            ("class_accuracy", lambda: metrics.class_accuracy(cells, cell_classes, clf)),
                            ("ffd", lambda: _finite_or_none(metrics.feature_frechet_distance(cells, real, clf)))):
                try:
                    q[key] = fn()
                except Exception as exc:  # e.g. FFD of a single sample: recorded, not fatal
                    q[key] = None
                    q.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
            row["quality"] = q
            row["macs_per_sample"] = total_macs / samples
        except Exception as exc:
            row["status"], row["reason"] = "failed", f"sampling: {type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=6)
            runners.pop(row["key"], None)
        progress.advance(task, f"{name}: quality {row['key']}")
    base = next((r for r in rows if r["method"] == "baseline"), None)
    base_macs = base.get("macs_per_sample") if base else None
    for row in rows:
        if row["status"] != "pending":
            continue
        m = row.get("macs_per_sample")
        row["mac_ratio"] = (m / base_macs) if (m is not None and base_macs) else None
        if row["method"] == "baseline":
            row["status"] = "reference"
        elif row["params"].get("exact"):
            # An exact pass saves time, not MACs; what it must keep is the samples, bit for bit.
            identical = row["quality"]["identical_to_reference"]
            row["status"] = "exact" if identical else "failed"
            row["reason"] = ("samples identical to the reference" if identical else
                             "an exact pass changed the samples")
        elif row["mac_ratio"] is not None and row["mac_ratio"] < 1.0 - 1e-4:
            row["status"] = "ok"
        else:
            row["status"] = "no effect"
            row["reason"] = ("MACs per sample did not drop below the reference"
                             + (" and the samples are identical to the reference" if row["quality"]["identical_to_reference"] else
                                " (the samples do differ from the reference)"))

    if checkpoint is not None:  # a run cut short during timing still leaves MACs and quality on disk
        out["results"] = rows
        out["partial"] = "timing not finished"
        checkpoint(out)
        del out["partial"]

    # -- 3. timing (interleaved) + peak memory -------------------------------------------------
    timed = [r for r in rows if r["key"] in runners]
    tcl, tsd = classes[:batch], seeds[:batch]
    task = progress.task(f"{name}: timing", len(timed) * (repeats + 1))
    for row in timed:  # warm-up round, which is also the memory measurement
        runner = runners[row["key"]]
        try:
            _, peak = peak_allocated_bytes(lambda: ctx.sample(runner, tcl, tsd))
            row["peak_alloc_mib"] = None if peak is None else peak / 2 ** 20
        except Exception as exc:
            row["status"], row["reason"] = "failed", f"warm-up: {type(exc).__name__}: {exc}"
            runners.pop(row["key"], None)
        progress.advance(task, f"{name}: warm-up {row['key']}")
    timed = [r for r in timed if r["key"] in runners]
    times: dict[str, list[float]] = {r["key"]: [] for r in timed}
    orders = []
    for rep in range(repeats):
        k = rep % max(1, len(timed))
        order = timed[k:] + timed[:k]
        orders.append([r["key"] for r in order])
        for row in order:
            runner = runners[row["key"]]
            t0 = time.perf_counter()
            ctx.sample(runner, tcl, tsd)
            times[row["key"]].append((time.perf_counter() - t0) / batch)
            progress.advance(task, f"{name}: timing round {rep + 1}/{repeats}")
    base_t = None
    for row in timed:
        ts = times[row["key"]]
        row["timing"] = {"s_per_sample": ts, "median_s_per_sample": _median(ts) if ts else None,
                         "batch": batch, "repeats": len(ts)}
        if row["method"] == "baseline":
            base_t = row["timing"]["median_s_per_sample"]
    for row in timed:
        med = row["timing"]["median_s_per_sample"]
        row["speedup"] = (base_t / med) if (base_t and med) else None
    out["timing_orders"] = orders
    out["results"] = rows
    out["wall_s"] = round(time.perf_counter() - t_model, 1)
    out["max_rss_mib_after"] = round(max_rss_mib(), 1)
    return out


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def run_models(models: list[str], methods: list[str] | None = None, *, samples: int = 32, repeats: int = 5,
               batch: int = 4, threads: int = 2, quick: bool = False, steps: int | None = None,
               calibration_samples: int | None = None, validation_samples: int | None = None, out_dir: str | Path | None = None,
               command: str | None = None, progress: bool = True, merge: bool = False,
               setting_index: int | None = None, only: list[str] | None = None,
               on_model_done: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Benchmark ``methods`` on each zoo model; returns the results dict (see BENCHMARKS.md) and,
    with ``out_dir``, writes ``models.json``, ``models.md`` and ``models_pareto.png`` there after
    every model (a run cut short still leaves the finished models on disk).

    With ``merge``, models already in ``out_dir/models.json`` that this run does not measure are
    kept (each model records the command, date, configuration and load of its own run)."""
    methods = list(methods or DEFAULT_METHODS)
    settings_for(methods, only=only)  # validate names early
    if samples < 1 or repeats < 1 or batch < 1:
        raise ValueError("samples, repeats and batch must be >= 1")
    batch = min(batch, samples)
    calibration_samples = calibration_samples or (2 if quick else 8)
    # The budget gate checks a confidence bound on the held-out mean PSNR: more held-out samples
    # than calibration samples keep that bound tight at little cost (sampling only).
    validation_samples = validation_samples or (2 if quick else 16)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = _dt.datetime.now(_dt.timezone.utc)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command or " ".join(sys.argv),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(threads),
        "config": {"models": models, "methods": methods, "samples": samples, "repeats": repeats, "batch": batch,
                   "threads": threads, "quick": quick, "steps": steps, "calibration_samples": calibration_samples,
                   "validation_samples": validation_samples, "setting_index": setting_index, "only": only,
                   "seeds": {"evaluation": EVAL_SEED0, "calibration": CAL_SEED0, "validation": VAL_SEED0}},
        "complete": False,
        "models": {},
    }
    kept: dict[str, Any] = {}
    if merge and out_dir is not None and (Path(out_dir) / "models.json").is_file():
        import json

        old = json.loads((Path(out_dir) / "models.json").read_text())
        kept = {k: v for k, v in old.get("models", {}).items() if k not in models}
        result["models"].update(kept)
    wanted = list(kept) + list(models)
    result["config"]["models"] = wanted
    t0 = time.perf_counter()
    try:
        with _Progress(progress) as prog:
            for name in models:
                run_info = {"command": result["command"], "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            "config": {k: v for k, v in result["config"].items() if k != "models"},
                            "loadavg_at_start": _loadavg()}
                def checkpoint(partial: dict[str, Any], name: str = name, run_info: dict = run_info) -> None:
                    if out_dir is not None:
                        snapshot = dict(result, models=dict(result["models"]), complete=False)
                        snapshot["models"][name] = dict(partial, run=run_info)
                        write_outputs(snapshot, out_dir)

                res = _bench_model(name, methods, samples=samples, repeats=repeats, batch=batch,
                                   quick=quick, steps=steps, calibration_samples=calibration_samples, validation_samples=validation_samples, progress=prog,
                                   setting_index=setting_index, only=only, checkpoint=checkpoint)
                run_info["loadavg_at_end"] = _loadavg()
                res["run"] = run_info
                result["models"][name] = res
                result["wall_s"] = round(time.perf_counter() - t0, 1)
                result["complete"] = all(m in result["models"] for m in wanted)
                if out_dir is not None:
                    write_outputs(result, out_dir)
                if on_model_done is not None:
                    on_model_done(result)
    finally:
        torch.set_num_threads(prev_threads)
    result["machine"]["loadavg_at_end"] = _loadavg()
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


def _loadavg() -> list[float] | None:
    import os

    try:
        return list(os.getloadavg())
    except OSError:
        return None


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    import json

    from ditopt.io import atomic_write_text

    from .report import markdown_report, pareto_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "models.json", "markdown": out / "models.md", "plot": out / "models_pareto.png"}
    atomic_write_text(paths["json"], json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], markdown_report(result))
    pareto_plot(result, paths["plot"])
    return paths
