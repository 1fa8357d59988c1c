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


class CondOnlyOutput(torch.nn.Module):
    """Conditional-only steps at the model output: on a step where ``pattern(step)`` is false
    the model runs on the conditional half of a batched-CFG call and the unconditional half is
    rebuilt from the difference (unconditional minus conditional) of the last full step (order
    0) or extrapolated linearly in the step index from the last two (order 1)."""

    def __init__(self, model, pattern, order: int = 0):
        super().__init__()
        self.m, self.pattern, self.order = model, pattern, order
        self.step, self.deltas = 0, []  # [(step, difference)] of the last two full steps

    def forward(self, return_dict=False, **kw):
        n2 = kw["hidden_states"].shape[0]
        n = n2 // 2
        if self.pattern(self.step) or not self.deltas:
            out = self.m(**kw, return_dict=False)[0]
            self.deltas = (self.deltas + [(self.step, out[:n] - out[n:])])[-2:]
        else:
            half = {k: (v[n:] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n2 else v) for k, v in kw.items()}
            c = self.m(**half, return_dict=False)[0]
            s1, d = self.deltas[-1]
            if self.order == 1 and len(self.deltas) == 2:
                s0, d0 = self.deltas[0]
                d = d + (d - d0) * (self.step - s1) / (s1 - s0)
            out = torch.cat([c + d, c], 0)
        self.step += 1
        return (out,)


def cond_only_patterns(steps: int) -> list:
    """(label, pattern) pairs: which steps compute in full."""
    return [("every other step", lambda s: s % 2 == 0), ("every 3rd full", lambda s: s % 3 == 0),
            ("every 4th full", lambda s: s % 4 == 0),
            ("every other, last half", lambda s: s < steps // 2 or s % 2 == 0),
            ("every other, last third", lambda s: s < 2 * steps // 3 or s % 2 == 0),
            ("every other after 10", lambda s: s < 10 or s % 2 == 0)]
