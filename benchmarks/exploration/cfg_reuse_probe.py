"""What conditional-only steps cost in PSNR, at the model-output level and with every step
otherwise computed: on the marked steps the model runs on the conditional half of the CFG batch
and the unconditional half is rebuilt as the conditional output plus the difference of the last
full step. Held-out seeds of the benchmark; also the time of a half-batch call against a full one.

    python benchmarks/exploration/cfg_reuse_probe.py dit-digits
"""
import sys, time, torch
from explore_setup import CondOnlyOutput, cond_only_patterns, setup
from ditopt.metrics import psnr_per_sample

name = sys.argv[1]
bundle, model, calibration, held_out = setup(name)

ref = held_out(model)
steps = bundle.default_steps
patterns = cond_only_patterns(steps)
for label, pat in patterns:
    w = CondOnlyOutput(model, pat)
    x = held_out(w)
    p = torch.tensor(psnr_per_sample(x, ref))
    full = sum(1 for s in range(steps) if pat(s) or s == 0)
    print(f"{label:20s} full {full}/{steps}  psnr mean {p.mean():.2f} min {p.min():.2f}", flush=True)

# timing of full vs half batch
kw = bundle.make_inputs(4)
half = {k: (v[4:] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 8 else v) for k, v in kw.items()}
with torch.inference_mode():
    for _ in range(3): model(**kw); model(**half)
    tf, th = [], []
    for _ in range(15):
        t0 = time.perf_counter(); model(**kw); tf.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); model(**half); th.append(time.perf_counter() - t0)
tf.sort(); th.sort()
print(f"full-batch call {tf[7]*1e3:.2f} ms, half-batch {th[7]*1e3:.2f} ms, ratio {th[7]/tf[7]:.3f}")
