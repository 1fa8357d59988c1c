"""Linear attention (issue #35): the kernel against its float64 reference (CPU chunks, Triton in
the interpreter, autograd), and the `linear_attention` pass (graph before and after, distillation
lowering the error against the original, the user's model untouched, must-not-fire cases)."""

from __future__ import annotations

import textwrap

import pytest
import torch

import ditopt
from ditopt.calibration import calibrate
from ditopt.errors import InvalidProfileError
from ditopt.kernels.linear_attention import linear_attention_cpu, linear_attention_reference
from ditopt.registry import PassContext, get_pass
from triton_interpreter import needs_triton, run_interpreted

LINEAR = "ditopt.linear_attention.default"
SDPA = "aten.scaled_dot_product_attention.default"


def _qkvw(n_text=4, side=6, heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_text + side * side
    q, k, v = (torch.randn(2, heads, n, d, generator=g) for _ in range(3))
    return q, k, v, 0.1 * torch.randn(heads, d, 3, 3, generator=g)


@pytest.mark.parametrize("feature", ["relu", "elu"])
def test_cpu_chunks_and_op_match_the_reference(feature):
    q, k, v, w = _qkvw()
    want = linear_attention_reference(q.double(), k.double(), v.double(), w.double(), 6, 6, 4, feature)
    assert torch.allclose(linear_attention_cpu(q, k, v, w, 6, 6, 4, feature, chunk=7).double(), want, atol=1e-5)
    assert torch.allclose(torch.ops.ditopt.linear_attention(q, k, v, w, 6, 6, 4, feature).double(), want, atol=1e-5)
    # The formula by hand for one query: normalised phi-weighted values plus the convolution term.
    phi = torch.relu if feature == "relu" else (lambda x: torch.nn.functional.elu(x) + 1)
    fq, fk = phi(q[0, 0, 0].double()), phi(k[0, 0].double())
    scores = fk @ fq
    assert torch.allclose(want[0, 0, 0], (scores @ v[0, 0].double()) / (scores.sum() + 1e-6), atol=1e-6)  # text row: no conv


def test_backward_is_the_references():
    q, k, v, w = (x.double().requires_grad_() for x in _qkvw(side=4, d=4))
    assert torch.autograd.gradcheck(lambda a, b, c, d: torch.ops.ditopt.linear_attention(a, b, c, d, 4, 4, 4, "elu"),
                                    (q, k, v, w))


_TRITON_SCRIPT = textwrap.dedent("""
    import json, os, torch
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from ditopt.kernels.linear_attention import linear_attention_reference
    from ditopt.kernels.linear_attention_triton import linear_attention_triton
    g = torch.Generator().manual_seed(0)
    errs = {}
    for feature in ("relu", "elu"):
        q, k, v = (torch.randn(1, 2, 4 + 100, 16, generator=g) for _ in range(3))
        w = 0.1 * torch.randn(2, 16, 3, 3, generator=g)
        want = linear_attention_reference(q.double(), k.double(), v.double(), w.double(), 10, 10, 4, feature)
        got = linear_attention_triton(q, k, v, w, 10, 10, 4, feature, block_n=32, block_m=32)
        errs[feature] = float((got.double() - want).abs().max())
    print("RESULT" + json.dumps(errs))
""")


@needs_triton
def test_triton_kernel_interpreter_matches_reference():
    errs = run_interpreted(_TRITON_SCRIPT)
    assert max(errs.values()) < 1e-4, errs


# -- the pass ------------------------------------------------------------------------------
STEPS = 4


def _model():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    kwargs = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([999, 999]),
              "class_labels": torch.tensor([1, 2]), "return_dict": False}
    return model, kwargs


def _sampler(kwargs):
    starts = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def run(model):
        outs = []
        for x in starts:
            for t in torch.linspace(999, 100, STEPS):
                x = x - 0.1 * model(**{**kwargs, "hidden_states": x, "timestep": t.repeat(2).long()})[0]
            outs.append(x)
        return torch.cat(outs)

    return run


@pytest.fixture(scope="module")
def calibrated():
    model, kwargs = _model()
    graph = ditopt.capture(model, kwargs)
    stats = calibrate(model, graph, ["block_inputs"], _sampler(kwargs), progress=False)
    return model, kwargs, graph, stats


def _ops(graph, block):
    return [str(n.target) for n in graph.segment_for_block(block).module.graph.nodes if n.op == "call_function"]


def test_graph_before_and_after_and_distillation_lowers_the_error(calibrated):
    model, kwargs, graph, stats = calibrated
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = get_pass("linear_attention")
    ctx = PassContext(model=model, stats=stats, num_steps=STEPS)
    bare = spec.apply(graph, spec.config.model_validate({"layers": {"1": "elu"}, "distill_steps": 0}), ctx)
    trained = spec.apply(graph, spec.config.model_validate({"layers": {"1": "elu"}, "distill_steps": 60, "distill_lr": 3e-3}), ctx)
    assert SDPA in _ops(graph, 1) and LINEAR not in _ops(graph, 1)  # the input graph is unchanged
    for result in (bare, trained):
        assert result.modified and result.report["substituted"] == [1]
        assert LINEAR in _ops(result.graph, 1) and SDPA not in _ops(result.graph, 1)
        assert SDPA in _ops(result.graph, 0)  # block 0 not named: dense
    with torch.inference_mode():  # optimize's runtime may re-run a pass inside the user's inference mode
        inside = spec.apply(graph, spec.config.model_validate({"layers": {"0": "relu"}, "distill_steps": 3}), ctx)
    assert inside.modified and inside.report["distillation"]["steps"] == 3
    fit = trained.report["distillation"]["fits"]["1:elu"]
    assert fit["held_out_after"] < fit["held_out_before"]
    assert trained.report["replayed_error"]["rel_sq_err"] < bare.report["replayed_error"]["rel_sq_err"]
    # Numerics against the original: the denoiser output replayed on calibration rows stays close.
    assert 0 < trained.report["replayed_error"]["rel_sq_err"] < 0.5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched


def test_must_not_fire_and_bad_input(calibrated):
    model, kwargs, graph, stats = calibrated
    spec = get_pass("linear_attention")
    ctx = PassContext(model=model, stats=stats, num_steps=STEPS)
    done = spec.apply(graph, spec.config.model_validate({"layers": {"0": "relu"}, "distill_steps": 0}), ctx)
    again = spec.apply(done.graph, spec.config.model_validate({"layers": {"0": "relu"}, "distill_steps": 0}), ctx)
    assert not again.modified and "already substituted" in again.report["skipped"]
    with pytest.raises(InvalidProfileError, match="block 5"):
        spec.apply(graph, spec.config.model_validate({"layers": {"5": "elu"}, "distill_steps": 0}), ctx)
    with pytest.raises(ValueError, match="odd"):
        spec.config.model_validate({"conv_size": 4})
    with pytest.raises(ValueError, match="block index"):
        spec.config.model_validate({"layers": {"attn": "elu"}})


def test_a_new_call_shape_runs_the_distilled_layers_as_fitted(calibrated):
    """optimize distils once; a call at another batch size runs the same weights (not a refit on the
    rows of that batch: with rows 4 a batch of 8 could not be refitted at all), so row for row the
    model at batch 8 is the model at batch 2 that was verified."""
    model, kwargs, _, _ = calibrated
    profile = {"name": "la", "budget": {"max_rel_err": 1.0},
               "passes": [{"name": "linear_attention", "layers": {"1": "elu"}, "distill_steps": 20, "rows": 4}]}
    opt = ditopt.optimize(model, profile, example_inputs=kwargs, calibration=_sampler(kwargs))
    fits = [p.report["distillation"]["fits"] for p in opt.report.passes if p.name == "linear_attention"]
    assert list(fits[0]) == ["1:elu"]
    g = torch.Generator().manual_seed(9)
    big = {**kwargs, "hidden_states": torch.randn(8, 4, 8, 8, generator=g), "timestep": torch.full((8,), 500),
           "class_labels": torch.arange(8) % 10}
    small = {**kwargs, **{k: big[k][:2] for k in ("hidden_states", "timestep", "class_labels")}}
    with torch.no_grad():
        out_small = opt(**small)[0]
        out_big = opt(**big)[0]  # a second capture, the pass replayed at batch 8
        dense = model(**small)[0]
    assert len(opt.programs) == 2
    assert torch.allclose(out_big[:2], out_small, atol=1e-5), (out_big[:2] - out_small).abs().max()
    assert (out_small - dense).abs().max() > 1e-4  # substituted, not dense


def test_joint_stage_trains_the_replaced_layers_together_toward_the_output(calibrated):
    """After the layer-wise fits, `joint_steps` trains both replaced layers through the whole stack:
    its held-out loss (each row's error over its layer-wise error, 1.0 at the start) falls, the
    shipped tensors are the jointly trained ones, and the dense block-free parts stay the original."""
    model, kwargs, graph, stats = calibrated
    spec = get_pass("linear_attention")
    ctx = PassContext(model=model, stats=stats, num_steps=STEPS)
    base = {"layers": {"0": "relu", "1": "elu"}, "distill_steps": 20, "distill_lr": 3e-3, "rows": 8}
    layerwise = spec.apply(graph, spec.config.model_validate(base), ctx)
    joint = spec.apply(graph, spec.config.model_validate({**base, "joint_steps": 40, "joint_rows": 8}), ctx)
    log = next(iter(joint.report["distillation"]["joint"].values()))
    assert log["held_out_before"] == pytest.approx(1.0) and log["held_out_after"] < 1.0
    assert "joint" not in layerwise.report["distillation"]
    conv = [n.target for n in joint.graph.segment_for_block(0).module.graph.nodes
            if n.op == "get_attr" and "linear_attention_conv" in str(n.target)][0]
    w_joint = getattr(joint.graph.segment_for_block(0).module, conv)
    w_layer = getattr(layerwise.graph.segment_for_block(0).module, conv)
    assert not torch.equal(w_joint, w_layer)  # the joint stage moved block 0's tensors
    # Replaying the result on a new graph (another call shape) gives the jointly trained tensors.
    again = joint.rewrite(graph)
    assert torch.equal(getattr(again.segment_for_block(0).module, conv), w_joint)
    assert joint.graph.epilogue.module is graph.epilogue.module
    # optimize may capture, rewrite and search inside inference mode: every weight the stack
    # multiplies by is then an inference tensor, which autograd cannot save.
    with torch.inference_mode():
        inside = spec.apply(ditopt.capture(model, kwargs), spec.config.model_validate(
            {**base, "joint_steps": 3, "joint_rows": 8}), ctx)
    assert next(iter(inside.report["distillation"]["joint"].values()))["steps"] == 3
