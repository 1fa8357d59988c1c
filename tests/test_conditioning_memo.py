"""Timestep memo: the timestep-only subgraph moves into a memo, outputs stay bitwise equal."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, make_inputs
from toy_models import AffineBlock, AffineDiT, toy_inputs

import ditopt
from ditopt.passes.timestep_memo import MEMO_MODULE, TimestepMemo

MEMO = {"name": "memo", "passes": [{"name": "timestep_memo"}]}


def _ops(module: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in module.graph.nodes if n.op == "call_function"}


def _memos(graph) -> list[TimestepMemo]:
    return [m for seg in graph.segments for m in seg.module.modules() if isinstance(m, TimestepMemo)]


def _timestep_key(kwargs: dict) -> str:
    return next(k for k in ("timestep", "t") if k in kwargs)


def _with_timestep(kwargs: dict, t: torch.Tensor) -> dict:
    key = _timestep_key(kwargs)
    return {**kwargs, key: t.to(kwargs[key].dtype)}


def _first(out) -> torch.Tensor:
    return torch.utils._pytree.tree_leaves(out)[0]


def test_graph_before_and_after_on_diffusers_dit():
    """diffusers' DiT embeds the timestep in every block (AdaLayerNormZero) and again in the
    final layer: the sinusoid and MLP leave those segments for the memo's head."""
    model = build_model("dit")
    kwargs = make_inputs("dit", model)
    before = ditopt.capture(model, kwargs)
    optimized = ditopt.optimize(model, MEMO, example_inputs=kwargs)
    after = optimized.programs[0]
    record = optimized.report.passes[0]
    assert record.applied and record.verification["passed"]
    assert set(record.report["segments"]) == {"block.0", "block.1", "epilogue"}
    assert f"{record.report['ops_per_call']} timestep-only ops in 3 segments" in record.report["summary"]
    for name in record.report["segments"]:
        old, new = before.segment(name).module, after.segment(name).module
        assert "aten.sin.default" in _ops(old) and "aten.sin.default" not in _ops(new)
        head = getattr(new, MEMO_MODULE).head
        assert {"aten.sin.default", "aten.cos.default", "aten.silu.default"} <= _ops(head)
        # What reads the class label (and the hidden states) stays in the segment.
        assert "aten.embedding.default" in _ops(new) and "aten.embedding.default" not in _ops(head)
    # The prologue (patch embedding) does not read the timestep and is left alone.
    assert after.prologue.module.code == before.prologue.module.code


@pytest.mark.parametrize("arch", ["dit", "pixart", "sd3", "flux", "wan", "plain"])
def test_outputs_bitwise_equal_to_the_captured_graph_across_generations(arch):
    """Two 'generations' over the same three timesteps: the second reads every embedding from
    the memo, and every output equals the unmemoized graph's bit for bit (and the original
    model's to float tolerance)."""
    model = build_model(arch)
    kwargs = make_inputs(arch, model)
    plain = ditopt.optimize(model, "identity", example_inputs=kwargs)
    memo = ditopt.optimize(model, MEMO, example_inputs=kwargs)
    if not memo.report.passes[0].modified:
        pytest.skip(f"{arch}: {memo.report.passes[0].report['reason']}")
    timesteps = [torch.full_like(kwargs[_timestep_key(kwargs)], v, dtype=torch.float32) for v in (900.0, 500.0, 20.0)]
    memos = _memos(memo.programs[0])
    for m in memos:  # optimize's own verification calls filled it
        m.clear()
    with torch.no_grad():
        for _generation in range(2):
            for t in timesteps:
                call = _with_timestep(kwargs, t)
                got, want = memo(**call), plain(**call)
                for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True):
                    assert torch.equal(a, b)
                torch.testing.assert_close(_first(got), _first(model(**call)), rtol=1e-4, atol=1e-5)
    assert memos and all(m.misses == 3 and m.hits == 3 for m in memos)


def test_rows_with_other_timesteps_miss_instead_of_reusing():
    """The key is the whole timestep tensor: swapping the CFG rows' timesteps is a new entry
    and gives the right per-row embedding."""
    model = build_model("dit")
    kwargs = make_inputs("dit", model, batch=2)
    plain = ditopt.optimize(model, "identity", example_inputs=kwargs)
    memo = ditopt.optimize(model, MEMO, example_inputs=kwargs)
    for m in _memos(memo.programs[0]):
        m.clear()
    with torch.no_grad():
        for rows in ([10, 700], [700, 10], [10, 700]):
            call = _with_timestep(kwargs, torch.tensor(rows))
            assert torch.equal(_first(memo(**call)), _first(plain(**call)))
    assert all(m.misses == 2 for m in _memos(memo.programs[0]))


def test_does_not_fire_without_a_timestep_only_computation():
    """The toy DiT uses the raw timestep (t * w): no op depends on the timestep alone, so there
    is nothing to remember and the graph is returned unchanged."""
    model = AffineDiT().eval()
    optimized = ditopt.optimize(model, MEMO, example_inputs=toy_inputs())
    record = optimized.report.passes[0]
    assert not record.modified
    assert "no segment computes >= 4 ops from the timestep alone" in record.report["reason"]
    assert not _memos(optimized.programs[0])


class NoisyEmbeddingDiT(torch.nn.Module):
    """A timestep embedding with a random term after its MLP: the MLP may be remembered, the
    draw must stay live (and so must everything after it)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, width))
        self.width = width
        self.blocks = torch.nn.ModuleList([AffineBlock(width, 1.0, i) for i in range(2)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-torch.arange(self.width // 2, dtype=torch.float32))
        angles = timestep[:, None].float() * freqs[None]
        emb = self.mlp(torch.cat([angles.sin(), angles.cos()], -1))
        emb = emb + 0.1 * torch.randn_like(emb)
        h = x + emb[:, None]
        for block in self.blocks:
            h = block(h, timestep)
        return h


def test_random_ops_are_never_remembered():
    model = NoisyEmbeddingDiT().eval()
    kwargs = toy_inputs()
    optimized = ditopt.optimize(model, {"name": "memo", "budget": {"max_rel_err": 1.0}, "passes": [{"name": "timestep_memo"}]},
                                example_inputs=kwargs)
    graph = optimized.programs[0]
    memos = _memos(graph)
    assert memos, optimized.report.passes[0].report
    head_ops = set().union(*(_ops(m.head) for m in memos))
    live_ops = set().union(*(_ops(seg.module) for seg in graph.segments))
    assert "aten.sin.default" in head_ops and "aten.randn_like.default" not in head_ops
    assert "aten.randn_like.default" in live_ops
    with torch.no_grad():
        torch.manual_seed(1)
        first = optimized(**kwargs)
        torch.manual_seed(2)
        second = optimized(**kwargs)
        torch.manual_seed(2)
        again = optimized(**kwargs)
    assert memos[0].hits >= 2  # the MLP was remembered ...
    assert not torch.equal(first, second) and torch.equal(second, again)  # ... the draw was not


def test_autograd_and_dtype_changes_bypass_or_clear_the_memo():
    model = build_model("dit")
    kwargs = make_inputs("dit", model)
    memo = ditopt.optimize(model, MEMO, example_inputs=kwargs)
    memos = _memos(memo.programs[0])
    for m in memos:
        m.clear()
    memo(**kwargs)  # grad enabled and trainable weights: computed, not remembered
    assert all(m.misses == 0 and m.hits == 0 and not m._memo for m in memos)
    with torch.no_grad():
        memo(**kwargs)
    assert all(len(m._memo) == 1 for m in memos)
    memo.to(torch.float64)  # remembered float32 values would now be stale
    assert all(not m._memo for m in memos)


def test_exported_segments_compute_the_embedding(tmp_path):
    """ONNX export traces the memo's fallback path, so the artifact runs the original
    computation at any timestep."""
    pytest.importorskip("onnxruntime")
    from ditopt.export import export_artifact, load_artifact

    model = build_model("dit")
    kwargs = {**make_inputs("dit", model), "return_dict": False}
    memo = ditopt.optimize(model, MEMO, example_inputs=kwargs)
    runner = load_artifact(export_artifact(memo, tmp_path / "artifact"))
    for t in (3, 611):
        call = {**kwargs, "timestep": torch.tensor([t])}
        with torch.no_grad():
            ref = model(**call)[0]
        torch.testing.assert_close(runner(**call)[0], ref, rtol=1e-4, atol=1e-4)
