"""Does extrapolating the CFG difference help conditional-only steps? Same wrapper as
cfg_reuse_probe.py (model-output level, every unmarked step computed in full), but the
unconditional half on a marked step is rebuilt from the conditional output plus the difference
(unconditional minus conditional) either frozen at the last full step (order 0, what the pass
does) or extrapolated linearly in the step index from the last two full steps (order 1).

    python benchmarks/exploration/cfg_delta_extrapolation.py dit-digits
"""
import sys, torch
from explore_setup import setup
from ditopt.metrics import psnr_per_sample

name = sys.argv[1]
bundle, model, calibration, held_out = setup(name)


class CondOnly(torch.nn.Module):
    def __init__(self, m, pattern, order):
        super().__init__(); self.m = m; self.pattern = pattern; self.order = order
        self.step = 0; self.deltas = []  # [(step, delta)] of the last two full steps

    def forward(self, return_dict=False, **kw):
        n2 = kw["hidden_states"].shape[0]; n = n2 // 2
        if self.pattern(self.step) or not self.deltas:
            out = self.m(**kw, return_dict=False)[0]
            self.deltas = (self.deltas + [(self.step, out[:n] - out[n:])])[-2:]
        else:
            half = {k: (v[n:] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n2 else v) for k, v in kw.items()}
            c = self.m(**half, return_dict=False)[0]
            (s1, d1) = self.deltas[-1]
            d = d1
            if self.order == 1 and len(self.deltas) == 2:
                s0, d0 = self.deltas[0]
                d = d1 + (d1 - d0) * (self.step - s1) / (s1 - s0)
            out = torch.cat([c + d, c], 0)
        self.step += 1
        return (out,)


ref = held_out(model)
steps = bundle.default_steps
patterns = [("every other step", lambda s: s % 2 == 0), ("every 3rd full", lambda s: s % 3 == 0),
            ("every 4th full", lambda s: s % 4 == 0),
            ("every other, last half", lambda s: s < steps // 2 or s % 2 == 0),
            ("every other after 10", lambda s: s < 10 or s % 2 == 0)]
for label, pat in patterns:
    for order in (0, 1):
        x = held_out(CondOnly(model, pat, order))
        p = torch.tensor(psnr_per_sample(x, ref))
        full = sum(1 for s in range(steps) if pat(s) or s == 0)
        print(f"{label:22s} order {order} full {full}/{steps}  psnr mean {p.mean():.2f} min {p.min():.2f}", flush=True)
