"""Distillation on calibration activations, shared by the lossy passes that train what they
introduced (linear attention's layers, MoE experts): the original model is the teacher, the
data is what calibration recorded, no dataset is needed.

`distill(params, loss, held_out, steps)` trains the tensors in `params` with Adam on
`loss(batch)` over the training batches, judges them every tenth of the run on the held-out
error, and returns the best judged state (never worse than the start on the held-out part).
Deterministic under `seed` (the batch order); it trains copies, so an interrupted run leaves the
caller's tensors as they were; and it escapes the caller's inference mode (a runtime may
re-run a pass for a new input shape inside it, where autograd records nothing).
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch


def distill(params: dict[str, torch.Tensor], loss: Callable[[dict[str, torch.Tensor], int], torch.Tensor],
            held_out: Callable[[dict[str, torch.Tensor]], float], steps: int, batches: int, lr: float = 1e-3,
            seed: int = 0, checks: int = 10) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train copies of `params` for `steps` Adam steps on `loss(params, batch)` with `batch`
    drawn from range(batches); returns the state with the lowest `held_out(params)` seen
    (the start included) and {before, after, steps, seconds}."""
    start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        live = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        with torch.no_grad():
            before = best = float(held_out(live))
        best_state = {k: v.detach().clone() for k, v in live.items()}
        if steps and batches:
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(live.values(), lr=lr)
            every = max(steps // checks, 1)
            for step in range(steps):
                value = loss(live, int(torch.randint(batches, (1,), generator=gen)))
                opt.zero_grad()
                value.backward()
                opt.step()
                if (step + 1) % every == 0 or step + 1 == steps:
                    with torch.no_grad():
                        now = float(held_out(live))
                    if now < best:
                        best, best_state = now, {k: v.detach().clone() for k, v in live.items()}
    return best_state, {"held_out_before": before, "held_out_after": best, "steps": steps,
                        "seconds": round(time.perf_counter() - start, 2)}


def plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `module` without inference tensors (parameters, buffers and plain tensor
    attributes): autograd saves the frozen weights a student multiplies by, and those are
    inference tensors when a pass runs inside inference mode."""
    with torch.inference_mode(False):
        module = copy.deepcopy(module)
        for m in module.modules():
            for holder in (m._parameters, m._buffers):
                for name, value in list(holder.items()):
                    if isinstance(value, torch.Tensor) and value.is_inference():
                        holder[name] = (torch.nn.Parameter(value.clone(), requires_grad=False)
                                        if isinstance(value, torch.nn.Parameter) else value.clone())
            for name, value in list(vars(m).items()):
                if isinstance(value, torch.Tensor) and value.is_inference():
                    setattr(m, name, value.clone())
    return module


def relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Sum of squared error over sum of squared target (the replay's error measure)."""
    return (got.float() - want.float()).pow(2).sum() / want.float().pow(2).sum().clamp_min(1e-30)
