"""Conditional-only steps (CFG reuse) of calibrated_schedule: with CFG batched into one call, a
step computes only the second half of the rows and rebuilds the first half from the difference
kept at the last full step. Numerics by hand on a toy, the cases where it must not act, the
budget search, and the half-batch program on the zoo architectures."""

from __future__ import annotations

import pytest
import torch
from toy_models import CondAffineDiT, cfg_sampler, euler_sampler

import ditopt
from ditopt.passes.caching import CachedSpan

TIMES = [4.0, 3.0, 2.0, 1.0]
BLOCKS = ["block.0", "block.1", "block.2"]


def _inputs(x, u, c, t):
    return {"x": torch.cat([x, x]), "timestep": torch.full((2 * x.shape[0],), float(t)), "cond": torch.cat([u, c])}


def _truth(model, x, t, cond):
    n = len(model.blocks)
    return model.blocks[0].scale ** n * x + t * model.total_w() + model.total_c() * t * cond[:, None, :]


def _explicit(model, x0, u, c, cond_only, computed=(0, 1, 2, 3), **extra):
    profile = {"name": "t", "budget": {"max_rel_err": 1e-5}, "passes": [
        {"name": "calibrated_schedule", "compute_steps": list(computed), "cond_only_steps": list(cond_only), "forecast": "taylor", "order": 1,
         **extra}]}
    return ditopt.optimize(model, profile, example_inputs=_inputs(x0, u, c, TIMES[0]), calibration=cfg_sampler(x0, u, c, TIMES))


@pytest.mark.parametrize("order", [0, 1])
def test_cond_only_steps_rebuild_the_first_half_by_hand(order):
    torch.manual_seed(0)
    model = CondAffineDiT(depth=3, scale=1.5).eval()
    x0, u, c = torch.randn(1, 4, 8), torch.zeros(1, 8), torch.randn(1, 8)
    opt = _explicit(model, x0, u, c, cond_only=(2, 3), cfg_delta_order=order)
    stage = opt.programs[0].plan[1]
    assert isinstance(stage, CachedSpan) and stage.policy.cond_only == (False, False, True, True)
    assert stage.policy.cfg_delta_order == order
    assert opt.report.passes[0].report["cond_only_steps"] == [2, 3]
    assert opt.report.passes[0].outcome.on_miss is None  # given steps, not searched: nothing to drop
    C = model.total_c()
    with torch.no_grad():
        for step, t in enumerate(TIMES):
            x = torch.randn(1, 4, 8)
            out = opt(**_inputs(x, u, c, t))
            first, second = out[:1], out[1:]
            assert torch.allclose(second, _truth(model, x, t, c), atol=1e-4)
            if step < 2:
                assert torch.allclose(first, _truth(model, x, t, u), atol=1e-4)
                assert "cond_only" not in opt.last_record
            elif order == 0:
                # residual of the second half + (first - second) kept at step 1 (t = 3):
                # the cond term C*t*c of this step plus C*3*(u - c), instead of C*t*u.
                rebuilt = _truth(model, x, t, c) + C * TIMES[1] * (u - c)[:, None, :]
                assert torch.allclose(first, rebuilt, atol=1e-4)
                assert not torch.allclose(first, _truth(model, x, t, u), atol=1e-2)
                assert opt.last_record["cond_only"] == BLOCKS
            else:
                # The difference C*t*(u - c) is linear in t, so the line through steps 0 and 1
                # (t = 4, 3) rebuilds it exactly at t = 2 and 1: the first half is the truth.
                assert torch.allclose(first, _truth(model, x, t, u), atol=1e-4)
                assert opt.last_record["cond_only"] == BLOCKS
    # The half-batch program was captured beside the full one.
    assert len(opt.programs) == 2


def test_cond_only_declines_calls_that_are_not_batched_cfg():
    torch.manual_seed(1)
    model = CondAffineDiT(depth=3, scale=1.5).eval()
    x0, u, c = torch.randn(1, 4, 8), torch.zeros(1, 8), torch.randn(1, 8)
    opt = _explicit(model, x0, u, c, cond_only=(2, 3))
    with torch.no_grad():
        for step, t in enumerate(TIMES):
            # step 2: the halves hold different latents, so it is no CFG pair: computed in full,
            # and no difference is kept; step 3 then has none to rebuild from: full again.
            a = torch.randn(1, 4, 8)
            b = torch.randn(1, 4, 8) if step == 2 else a
            out = opt(x=torch.cat([a, b]), timestep=torch.full((2,), t), cond=torch.cat([u, c]))
            assert torch.allclose(out, torch.cat([_truth(model, a, t, u), _truth(model, b, t, c)]), atol=1e-4)
            if step >= 2:
                assert "cond_only" not in opt.last_record
                reason = opt.last_record["cond_only_declined"][0]
                assert ("different latents" if step == 2 else "no full step with batched CFG") in reason, reason


def test_a_cfg_pair_after_a_call_that_is_none_starts_the_difference_over():
    """Step 1 is no CFG pair (the difference is cleared), step 2 is a pair again: the
    conditional-only step 3 rebuilds from step 2's difference alone (one kept step: no line to
    extrapolate along), not from step 0's, and is not declined."""
    torch.manual_seed(4)
    model = CondAffineDiT(depth=3, scale=1.5).eval()
    x0, u, c = torch.randn(1, 4, 8), torch.zeros(1, 8), torch.randn(1, 8)
    opt = _explicit(model, x0, u, c, cond_only=(3,))
    C = model.total_c()
    with torch.no_grad():
        for step, t in enumerate(TIMES):
            a = torch.randn(1, 4, 8)
            b = torch.randn(1, 4, 8) if step == 1 else a
            out = opt(x=torch.cat([a, b]), timestep=torch.full((2,), t), cond=torch.cat([u, c]))
            if step < 3:
                assert torch.allclose(out, torch.cat([_truth(model, a, t, u), _truth(model, b, t, c)]), atol=1e-4)
            else:
                assert opt.last_record["cond_only"] == BLOCKS and "cond_only_declined" not in opt.last_record
                rebuilt = _truth(model, a, t, c) + C * TIMES[2] * (u - c)[:, None, :]
                assert torch.allclose(out[:1], rebuilt, atol=1e-4)


def test_cond_only_steps_must_be_computed_steps():
    torch.manual_seed(2)
    model = CondAffineDiT(depth=2).eval()
    x0, u, c = torch.randn(1, 4, 8), torch.zeros(1, 8), torch.randn(1, 8)
    with pytest.raises(ditopt.errors.InvalidProfileError, match="computed steps"):
        _explicit(model, x0, u, c, cond_only=(2,), computed=(0, 1, 3))


def _budget(model, sampler, example, mode="auto", validation=None):
    schedule = {"name": "calibrated_schedule", "order": 1, "warmup": 2, "alpha": 0.0}
    profile = {"name": "b", "budget": {"min_psnr_db": 70.0}, "passes": [schedule if mode is None else {**schedule, "cfg_reuse": mode}]}
    # The search is under test, not the gate: its 2-sample bound may miss, so take the model back flagged.
    return ditopt.optimize(model, profile, example_inputs=example, calibration=sampler, validation=validation,
                           max_retries=0, on_gate_miss="return")


def _held_out_cfg(u, c, times, seed=11):
    """A CFG sampler on another starting latent: the held-out check's samples (one calibration
    sample cannot be split into search and held-out halves)."""
    return cfg_sampler(torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(seed)), u, c, times)


def test_budget_search_uses_cond_only_steps_only_on_batched_cfg():
    torch.manual_seed(3)
    model = CondAffineDiT(depth=3, scale=1.02).eval()
    times = [1.0 - i / 12 for i in range(12)]
    x0, u, c = torch.randn(1, 4, 8), torch.zeros(1, 8), 1e-6 * torch.randn(1, 8)
    sampler = cfg_sampler(x0, u, c, times)
    example = _inputs(x0, u, c, times[0])
    opt = _budget(model, sampler, example, validation=_held_out_cfg(u, c, times))
    assert opt.stats.meta["batched_cfg"] is True
    rep = opt.report.passes[0].report
    cond = rep.get("cond_only_steps", [])
    assert cond, rep["trials"]
    policy = opt.programs[0].plan[1].policy
    assert [i for i, h in enumerate(policy.cond_only) if h] == cond
    assert set(cond) <= set(rep["stages"][0]["compute_steps"]) and min(cond) >= rep["warmup"]
    # cheaper than the schedule without them, by the search's own cost model
    off = _budget(model, sampler, example, mode="off")
    k_off = off.report.passes[0].report["computed_steps"]
    assert "cond_only_steps" not in off.report.passes[0].report
    # opt-in: the default searches none (the schedule 'off' chose)
    default = _budget(model, sampler, example, mode=None)
    assert default.report.passes[0].config["cfg_reuse"] == "off"
    assert default.report.passes[0].report["stages"] == off.report.passes[0].report["stages"]
    assert rep["computed_steps"] - len(cond) * (1 - rep["cond_only_cost"]) < k_off
    e2e = opt.report.verification[-1]
    # 70 dB is what the search measured on its one calibration sample (a prediction); the
    # held-out sample reads a little less, and the gate judges that one.
    assert rep["predicted_psnr_db"] >= 70.0
    assert e2e["kind"] == "end-to-end" and 60.0 < float(e2e["psnr_db"]) < rep["predicted_psnr_db"]
    assert e2e["details"][0]["samples_from"].startswith("validation=")
    # Without validation= one calibration sample leaves nothing to hold out: unverified, flagged.
    assert not default.report.passed and "unverified" in default.report.verification[-1]["details"][0]
    # prepare() captures the half-batch program before the first generation
    fresh = _budget(model, sampler, example)
    fresh.prepare(**example)
    assert len(fresh.programs) == 2

    # The same model sampled without CFG (two different latents per call): never searched.
    plain = euler_sampler(torch.randn(2, 4, 8), times)
    no_cfg = _budget(model, lambda m: plain(_WithCond(m, torch.cat([u, c]))), {"x": torch.ones(2, 4, 8), "timestep": torch.ones(2), "cond": torch.cat([u, c])})
    assert no_cfg.stats.meta["batched_cfg"] is False
    assert "cond_only_steps" not in no_cfg.report.passes[0].report
    assert not any(t.get("cond_only") for t in no_cfg.report.passes[0].report["trials"])


@pytest.mark.parametrize("misses", [1, 2])
def test_a_held_out_miss_drops_cond_only_steps_before_tightening(held_out_misses, misses):
    """The first held-out miss of a schedule with conditional-only steps retries the same
    target without them (cfg_reuse='off' in the profile the report shows); a further miss
    tightens the target as usual."""
    torch.manual_seed(3)
    model = CondAffineDiT(depth=3, scale=1.02).eval()
    times = [1.0 - i / 12 for i in range(12)]
    x0, u, c = torch.randn(1, 4, 8), torch.zeros(1, 8), 1e-6 * torch.randn(1, 8)
    sampler, example = cfg_sampler(x0, u, c, times), _inputs(x0, u, c, times[0])
    seen = held_out_misses(misses, 0.5)
    # 60 dB: the held-out latent reads ~69 dB where the calibration one reads 70, so only the
    # injected misses (not real ones) drive the retries under test.
    profile = {"name": "b", "budget": {"min_psnr_db": 60.0},
               "passes": [{"name": "calibrated_schedule", "order": 1, "warmup": 2, "alpha": 0.0, "cfg_reuse": "auto"}]}
    opt = ditopt.optimize(model, profile, example_inputs=example, calibration=sampler,
                          validation=_held_out_cfg(u, c, times), max_retries=2)
    calls = [o.programs[0].plan[1].policy.cond_only for o in seen]
    assert len(calls) == misses + 1
    assert any(calls[0]) and not any(calls[1]) and not any(calls[-1])  # with, then without
    steps = [r["details"][-1] for r in opt.report.retries]
    assert steps[0] == {"next": "relax", "pass": "calibrated_schedule", "cfg_reuse": "off"}
    from ditopt.optimize import describe_retry

    assert describe_retry(opt.report.retries[0]).endswith("retried with calibrated_schedule cfg_reuse=off")
    report = opt.report.passes[0].report
    assert opt.report.profile["passes"][0]["cfg_reuse"] == "off" and "cond_only_steps" not in report
    if misses == 1:  # same target: 60 dB + the pass's 1 dB margin
        assert report["target_psnr_db"] == pytest.approx(61.0)
    else:
        assert steps[1]["next"] == "tighten" and report["target_psnr_db"] > 61.5
    assert opt.report.verification[-1]["passed"]


class _WithCond(torch.nn.Module):
    """Feeds a fixed `cond` to a model called as model(x=..., timestep=...)."""

    def __init__(self, model, cond):
        super().__init__()
        self.model, self.cond = model, cond

    def forward(self, x, timestep):
        return self.model(x=x, timestep=timestep, cond=self.cond)


@pytest.mark.parametrize("name", ["dit-digits", "flux-digits"])
def test_cond_only_step_on_the_zoo_architectures(name):
    """The half-batch program of a real architecture (with the exact passes of the presets)
    reads the same values as the full one: the conditional rows of a conditional-only step
    match the model's, and the rebuilt unconditional rows are close to it but not equal."""
    from ditopt import zoo

    bundle = zoo.load(name)
    model = bundle.model
    profile = {"name": "t", "budget": {"max_rel_err": 1e-4}, "passes": [
        # Each step below gets fresh random latents, not a trajectory: nothing to extrapolate
        # the CFG difference along, so it is kept as is (order 0).
        {"name": "calibrated_schedule", "compute_steps": [0, 1, 2, 3], "cond_only_steps": [2, 3], "forecast": "taylor", "order": 1,
         "cfg_delta_order": 0},
        {"name": "conditioning_memo"}, {"name": "patch_layout"}]}
    opt = ditopt.optimize(model, profile, example_inputs=bundle.make_inputs(1),
                          calibration=lambda m: bundle.sample([3], [0], steps=4, model=m))
    sched = bundle.make_scheduler()
    sched.set_timesteps(4)  # the calibrated steps, in the scheduler's units make_inputs takes
    with torch.no_grad():
        for step, t in enumerate(sched.timesteps.tolist()):
            kwargs = bundle.make_inputs(2, timestep=t, seed=step)
            out = opt(**kwargs, return_dict=False)[0]
            ref = model(**kwargs, return_dict=False)[0]
            n = out.shape[0] // 2
            assert torch.allclose(out[n:], ref[n:], atol=1e-4, rtol=1e-4), step
            err = float((out[:n] - ref[:n]).norm() / ref[:n].norm())
            if step < 2:
                assert err < 1e-5 and "cond_only" not in opt.last_record
            else:
                assert opt.last_record["cond_only"] and 1e-6 < err < 0.2, (step, err)


def test_extrapolated_difference_follows_the_timesteps():
    """The line through the last two full steps' differences, in timestep units (unevenly
    spaced steps included); one kept step, order 0, or a repeated timestep keep the last one."""
    from ditopt.passes.caching.stage import _extrapolated_difference

    a, b = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.0])
    kept = [(4.0, [a]), (3.0, [b])]
    # slope per unit t: (b - a) / (3 - 4); at t = 1, two units past t = 3
    assert torch.allclose(_extrapolated_difference(kept, 1.0, 1)[0], b + 2 * (b - a))
    assert torch.allclose(_extrapolated_difference(kept, 2.5, 1)[0], b + 0.5 * (b - a))
    assert _extrapolated_difference(kept, 1.0, 0)[0] is b
    assert _extrapolated_difference(kept[-1:], 1.0, 1)[0] is b
    assert _extrapolated_difference([(3.0, [a]), (3.0, [b])], 1.0, 1)[0] is b
