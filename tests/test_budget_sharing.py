"""The shared budget search (issue 29): node-level candidates as rewrites at the sampling shape,
lossy node-level passes judged end to end (not per call), and several lossy passes sharing one
error budget in profile order."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from toy_models import AffineDiT, euler_sampler, toy_inputs

import ditopt
from ditopt import registry
from ditopt.profiles.fields import Float, Int
from ditopt.registry import PassConfig, PassOutcome, PassResult, PassSpec, budget_shares
from ditopt.search import BudgetSearch

STEPS = 6
EPSILONS = [0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003]  # cheapest (most lossy) first


class _Scaled(nn.Module):
    """A block segment whose outputs are scaled by (1 + eps): a lossy rewrite of single calls."""

    def __init__(self, inner: nn.Module, eps: float) -> None:
        super().__init__()
        self.inner, self.eps = inner, eps

    def forward(self, *args):
        return tuple(o * (1.0 + self.eps) for o in self.inner(*args))


class ScaleConfig(PassConfig):
    block: Int = 0
    eps: Float | None = None  # None: searched against the budget


def _scale(graph, block: int, eps: float):
    seg = graph.segment_for_block(block)
    return graph.with_segment(seg.replace_module(_Scaled(seg.module, eps)))


def _scale_pass(graph, config: ScaleConfig, ctx):
    if config.eps is not None:
        return PassResult(_scale(graph, config.block, config.eps), True, {"eps": config.eps})
    search = BudgetSearch.start(ctx, "scale")
    chosen = search.cheapest(EPSILONS, key=lambda e: e, build=lambda e: (lambda g: _scale(g, config.block, e)),
                             describe=lambda e: {"eps": e})
    if chosen is None:
        return PassResult(graph, False, {"skipped": "no eps meets the budget", "trials": search.trials})
    report = {"eps": chosen, "target_psnr_db": search.target_psnr_db, "trials": search.trials}
    predicted = next(t["psnr_db"] for t in search.trials if t["eps"] == chosen)
    return PassResult(_scale(graph, config.block, chosen), True, report,
                      replay=("scale", config.model_copy(update={"eps": chosen})),
                      outcome=PassOutcome(predicted_psnr_db=predicted, target_psnr_db=search.target_psnr_db))


@pytest.fixture
def scale_pass(monkeypatch):
    """A lossy node-level pass, registered for the test only (the contract test's list stays as is)."""
    registry.load_plugins()
    spec = PassSpec("scale", ScaleConfig, _scale_pass, lossy=True, family=__name__)
    monkeypatch.setitem(registry._PASSES, "scale", spec)
    return spec


def _sampler(rows: int = 8):
    x0 = torch.randn(rows, 4, 8, generator=torch.Generator().manual_seed(3))
    times = [1.0 - j / STEPS for j in range(STEPS)]
    loops = [euler_sampler(x0[i : i + 2], times) for i in range(0, rows, 2)]  # batch 2: not the example's batch 1
    return lambda model: torch.cat([loop(model) for loop in loops])


def _profile(*passes, **budget):
    return {"name": "s", "budget": budget or {"min_psnr_db": 30.0}, "passes": list(passes)}


def test_equal_cumulative_shares_of_the_squared_error():
    assert budget_shares([True]) == [0.0]
    shares = budget_shares([True, False, True])
    assert shares[0] == pytest.approx(10 * math.log10(2)) and shares[1:] == [0.0, 0.0]
    # k-th of n lossy passes aims at a cumulative k/n of the allowed squared error.
    assert budget_shares([True, True, True]) == pytest.approx([10 * math.log10(3), 10 * math.log10(1.5), 0.0])


def test_a_node_level_rewrite_is_measured_at_the_sampling_shape(scale_pass):
    model = AffineDiT(depth=3, scale=1.0).eval()
    opt = ditopt.optimize(model, _profile({"name": "scale"}), example_inputs=toy_inputs(batch=1),
                          calibration=_sampler(), on_gate_miss="return")
    record = opt.report.passes[0]
    trials = record.report["trials"]
    # Had the evaluator run the unrewritten capture (plan transfer only), every trial would be exact.
    assert all(math.isfinite(t["psnr_db"]) for t in trials)
    assert record.applied and record.verification is None  # judged end to end, not per call
    assert record.resolved["eps"] == record.report["eps"] and 0.0003 <= record.report["eps"] < 0.3
    by_eps = {t["eps"]: t["psnr_db"] for t in trials}
    assert by_eps[record.report["eps"]] >= 30.0
    assert all(v < 30.0 for e, v in by_eps.items() if e > record.report["eps"])  # the cheaper ones missed
    per_call, end_to_end = opt.report.verification
    assert per_call["kind"] == "per-call" and per_call["gating"] is False and not per_call["passed"]
    assert end_to_end["kind"] == "end-to-end" and end_to_end["passed"] and opt.report.passed


def test_per_call_error_gates_a_lossy_pass_without_a_psnr_budget(scale_pass):
    model = AffineDiT(depth=3, scale=1.0).eval()
    opt = ditopt.optimize(model, _profile({"name": "scale", "eps": 0.1}, max_rel_err=1e-4),
                          example_inputs=toy_inputs(batch=1), on_gate_miss="return")
    assert not opt.report.passes[0].applied  # rolled back: 10% per call, over max_rel_err
    x = toy_inputs(batch=1)
    torch.testing.assert_close(opt(**x), model(**x))


def test_two_lossy_passes_share_one_budget_and_the_second_sees_the_first(scale_pass):
    model = AffineDiT(depth=3, scale=1.0).eval()
    both = ditopt.optimize(model, _profile({"name": "scale", "block": 0}, {"name": "scale", "block": 2}),
                           example_inputs=toy_inputs(batch=1), calibration=_sampler(), on_gate_miss="return")
    first, second = both.report.passes
    assert first.report["target_psnr_db"] == pytest.approx(30.0 + 10 * math.log10(2))
    assert second.report["target_psnr_db"] == pytest.approx(30.0)
    # The second search measured the composition: at the first's setting on block 2 alone the
    # samples would be as good as the first's alone, but with the first applied they are worse.
    alone = {t["eps"]: t["psnr_db"] for t in first.report["trials"]}
    composed = {t["eps"]: t["psnr_db"] for t in second.report["trials"]}
    shared = [e for e in composed if e in alone]
    assert shared and all(composed[e] < alone[e] for e in shared)
    assert both.report.passed
    x = toy_inputs(batch=1)
    expected = model(**x)  # blocks scale x + t*w; rescaling block 0 and 2 outputs: not equal to the original
    assert not torch.allclose(both(**x), expected)
