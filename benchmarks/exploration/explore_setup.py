"""Shared setup of the exploration scripts: the zoo model, the benchmark's seed sets (4
calibration seeds, 16 held-out seeds, disjoint classes/seeds), calibration stats, and the
per-sample PSNR of an optimized model on both seed sets."""
import torch
import ditopt
from ditopt import zoo
from ditopt.passes.caching.schedule import span_residual_sketch, step_changes

torch.set_num_threads(2)


def sampler(bundle, classes, seeds):
    """fn(model) -> samples for these (class, seed) pairs, as optimize's calibration argument."""
    return lambda model: bundle.sample(classes, seeds, model=model)


def setup(name: str, calibration_samples: int = 4):
    """(bundle, model, calibration fn, held-out fn)."""
    bundle = zoo.load(name)
    n = calibration_samples
    calibration = sampler(bundle, [i % 10 for i in range(n)], [200000 + i for i in range(n)])
    held_out = sampler(bundle, [(i + 5) % 10 for i in range(16)], [300000 + i for i in range(16)])
    return bundle, bundle.model, calibration, held_out


def psnr_both(optimized, calibration, ref_calibration, held_out, ref_held_out):
    """Per-sample PSNR tensors on the calibration and held-out seeds (a fresh generation each)."""
    from ditopt.metrics import psnr_per_sample

    on_calibration = torch.tensor(psnr_per_sample(calibration(optimized), ref_calibration))
    optimized.reset()
    return on_calibration, torch.tensor(psnr_per_sample(held_out(optimized), ref_held_out))


def calibrated(bundle, model, calibration):
    """Calibration stats on `calibration` and the per-step residual change the placements use."""
    profile = {"name": "x", "passes": [{"name": "calibrated_schedule", "computed_steps": 3, "forecast": "fitted", "order": 1, "alpha": 0.0}]}
    stats = ditopt.optimize(model, profile, example_inputs=bundle.make_inputs(2), calibration=calibration).stats
    residual = span_residual_sketch(stats, 0, stats.require("block_residual_sketch").shape[2] - 1)
    return stats, step_changes(residual)


def macs_of(fn, model) -> int:
    """Multiply-accumulates of one fn(model) run."""
    from ditopt.bench.measure import mac_counter

    with mac_counter() as macs:
        fn(model)
    return macs()


def print_row(label, optimized, base_macs, calibration, ref_calibration, held_out, ref_held_out):
    """One line: MAC reduction on the calibration run, mean PSNR on both seed sets, held-out minimum."""
    ratio = base_macs / macs_of(calibration, optimized)
    optimized.reset()
    pa, pv = psnr_both(optimized, calibration, ref_calibration, held_out, ref_held_out)
    print(f"{label:34s} macs x{ratio:5.2f} cal {pa.mean():6.2f} val {pv.mean():6.2f} min {pv.min():6.2f}", flush=True)
