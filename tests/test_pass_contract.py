"""The pass contract, checked for every registered pass (issue 29).

Each pass declares an `example` config that fires on a small diffusers DiT calibrated with the
collectors it `needs`. For each: its config survives a JSON round trip; applying it leaves the
input graph unchanged; applying it again to its own output does not stack a second rewrite; its
contract (level, needs, conflicts) is declared; and a report of a run with it loads back as a
profile that replays the same plan without searching.
"""

from __future__ import annotations

import pytest
import torch

import ditopt
from ditopt.calibration import calibrate
from ditopt.errors import InvalidProfileError
from ditopt.registry import PassContext, PassLevel, available_passes, get_pass

STEPS = 6
PASSES = sorted(available_passes())


def _model_and_inputs():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    kwargs = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([999, 999]),
              "class_labels": torch.tensor([1, 2]), "return_dict": False}
    return model, kwargs


def _sampler(kwargs):
    """Four samples, two per generation, over STEPS timesteps (a stand-in sampling loop)."""
    gen = torch.Generator().manual_seed(1)
    starts = [torch.randn(2, 4, 8, 8, generator=gen) for _ in range(2)]

    def run(model):
        outs = []
        for x in starts:
            x = x.clone()
            for t in torch.linspace(999, 100, STEPS):
                eps = model(**{**kwargs, "hidden_states": x, "timestep": t.repeat(2).long()})[0]
                x = x - 0.1 * eps
            outs.append(x)
        return torch.cat(outs)

    return run


def _describe(graph):
    """What a pass may not change in its input: the plan and every segment's code."""
    return ([type(s).__name__ + repr(getattr(s, "describe", lambda: None)()) for s in graph.plan],
            [(seg.name, seg.module.code) for seg in graph.segments])


@pytest.fixture(scope="module")
def calibrated():
    model, kwargs = _model_and_inputs()
    graph = ditopt.capture(model, kwargs)
    needs = sorted({n for name in PASSES for n in get_pass(name).needs})
    stats = calibrate(model, graph, needs, _sampler(kwargs), progress=False)
    return model, kwargs, graph, stats


@pytest.mark.parametrize("name", PASSES)
def test_the_contract_is_declared(name):
    spec = get_pass(name)
    assert isinstance(spec.level, PassLevel)
    assert spec.family.startswith("ditopt.passes.") and spec.description
    assert spec.example is not None
    # The example and the defaults (where they need nothing) validate and survive JSON.
    for data in (spec.example, {}):
        try:
            config = spec.config.model_validate(data)
        except Exception:
            assert data == {}, f"{name}: its example does not validate"
            continue
        assert spec.config.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize("name", PASSES)
def test_input_graph_unchanged_and_no_stacked_rewrite(name, calibrated):
    model, kwargs, graph, stats = calibrated
    spec = get_pass(name)
    config = spec.config.model_validate(spec.example)
    ctx = PassContext(model=model, stats=stats, num_steps=STEPS)
    before = _describe(graph)
    result = spec.apply(graph, config, ctx)
    assert _describe(graph) == before, f"{name} changed its input graph"
    assert result.modified, f"{name}: its example must fire on the contract model ({result.report})"
    again_before = _describe(result.graph)
    try:
        again = spec.apply(result.graph, config, ctx)
    except InvalidProfileError:
        pass  # refused, saying why: the pass owns something only one pass may own
    else:
        assert not again.modified or _describe(again.graph) == again_before or again.graph.plan == result.graph.plan, (
            f"{name} rewrote its own output a second time")
    assert _describe(result.graph) == again_before


@pytest.mark.parametrize("name", PASSES)
def test_a_report_loads_back_as_a_profile_that_replays_the_choice(name, calibrated):
    model, kwargs, _graph, _stats = calibrated
    spec = get_pass(name)
    profile = {"name": "contract", "budget": {"max_rel_err": 10.0}, "passes": [{"name": name, **spec.example}]}
    sampler = _sampler(kwargs)
    first = ditopt.optimize(model, profile, example_inputs=kwargs, calibration=sampler, num_steps=STEPS, on_gate_miss="return")
    replay = first.report.resolved_profile()
    assert replay.passes[0].name == name
    second = ditopt.optimize(model, replay, example_inputs=kwargs, calibration=sampler, num_steps=STEPS, on_gate_miss="return")
    assert _describe(second.programs[0])[0] == _describe(first.programs[0])[0]
    assert replay.passes[0].config == second.report.resolved_profile().passes[0].config  # a fixed point
    with torch.no_grad():
        a, b = sampler(first), sampler(second)
    assert torch.allclose(a, b, atol=1e-5)
    assert ditopt.profile_from_report(first.report.to_dict()) == replay


LOSSY_NODE = [n for n in PASSES if get_pass(n).lossy and get_pass(n).level is PassLevel.NODE]


@pytest.mark.parametrize("name", LOSSY_NODE)
def test_another_call_shape_runs_the_tensors_fitted_for_the_first(name, calibrated):
    """A call at a new batch size captures again and replays the passes: a pass that fitted tensors
    on calibration (cuts, refits, experts, distilled layers, quantized weights) must hand over the
    same tensors, not refit them on the rows of the new batch (another model than the one verified,
    and no fit at all where the recorded rows do not fill the batch)."""
    model, kwargs, _graph, _stats = calibrated
    spec = get_pass(name)
    profile = {"name": "contract", "budget": {"max_rel_err": 10.0}, "passes": [{"name": name, **spec.example}]}
    opt = ditopt.optimize(model, profile, example_inputs=kwargs, calibration=_sampler(kwargs), num_steps=STEPS,
                          on_gate_miss="return")
    big = {**kwargs, "hidden_states": torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(3)),
           "timestep": torch.full((6,), 500), "class_labels": torch.arange(6) % 10}
    with torch.no_grad():
        opt(**big)
    assert len(opt.programs) == 2
    first, second = ({seg.name: seg.module.state_dict() for seg in g.segments} for g in opt.programs)
    assert first.keys() == second.keys()
    for seg, tensors in first.items():
        assert tensors.keys() == second[seg].keys(), seg
        for key, value in tensors.items():
            assert torch.equal(value, second[seg][key]), f"{name}: {seg}.{key} differs at batch 6"


def test_conflicting_passes_are_refused_at_profile_load():
    claims = {name: set(get_pass(name).ensures) for name in PASSES}
    pairs = [(a, b) for a in PASSES for b in PASSES if a < b and set(get_pass(a).conflicts) & claims[b]]
    assert pairs, "no declared conflicts: the caching passes each claim the step schedule"
    a, b = pairs[0]
    with pytest.raises(InvalidProfileError, match="cannot share a profile"):
        ditopt.load_profile({"name": "x", "passes": [{"name": a, **get_pass(a).example}, {"name": b, **get_pass(b).example}]})
