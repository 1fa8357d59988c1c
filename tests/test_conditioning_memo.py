"""Conditioning memo: conditioning-only subgraphs move into memos, outputs stay bitwise equal."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, make_inputs
from toy_models import AffineBlock, AffineDiT, toy_inputs

import ditopt
from ditopt.passes.conditioning_memo import MEMO_MODULE, ConditioningMemo

MEMO = {"name": "memo", "passes": [{"name": "conditioning_memo"}]}


def _ops(module: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in module.graph.nodes if n.op == "call_function"}


def _memos(graph) -> list[ConditioningMemo]:
    return [m for seg in graph.segments for m in seg.module.modules() if isinstance(m, ConditioningMemo)]


def _timestep_key(kwargs: dict) -> str:
    return next(k for k in ("timestep", "t") if k in kwargs)


def _with_timestep(kwargs: dict, t: torch.Tensor) -> dict:
    key = _timestep_key(kwargs)
    return {**kwargs, key: t.to(kwargs[key].dtype)}


def _first(out) -> torch.Tensor:
    return torch.utils._pytree.tree_leaves(out)[0]


def test_graph_before_and_after_on_diffusers_dit():
    """diffusers' DiT embeds the timestep and the class label in every block (AdaLayerNormZero)
    and again in the final layer: the sinusoid, MLP, class embedding and the block's
    shift/scale/gate linear leave those segments for one memo keyed on both inputs."""
    model = build_model("dit")
    kwargs = make_inputs("dit", model)
    before = ditopt.capture(model, kwargs)
    optimized = ditopt.optimize(model, MEMO, example_inputs=kwargs)
    after = optimized.programs[0]
    record = optimized.report.passes[0]
    assert record.applied and record.verification["passed"]
    assert record.report["keys"] == ["class_labels", "timestep"]  # never the latent
    assert set(record.report["segments"]) == {"block.0", "block.1", "epilogue"}
    assert f"{record.report['ops_per_call']} conditioning-only ops in 3 segments (3 memos)" in record.report["summary"]
    moved = {"aten.sin.default", "aten.cos.default", "aten.silu.default", "aten.embedding.default", "aten.linear.default"}
    for name in record.report["segments"]:
        old, new = before.segment(name).module, after.segment(name).module
        memo = getattr(new, MEMO_MODULE)
        assert memo.keys == ("timestep", "class_labels") or memo.keys == ("class_labels", "timestep")
        assert moved <= _ops(old) and moved <= _ops(memo.head)
        assert not {"aten.sin.default", "aten.embedding.default"} & _ops(new)
        # What reads the hidden states (the modulated norm, attention, FFN) stays in the segment.
        assert "aten.layer_norm.default" in _ops(new) and "aten.layer_norm.default" not in _ops(memo.head)
    # The prologue (patch embedding) reads only the latent and is left alone.
    assert after.prologue.module.code == before.prologue.module.code


def test_flux_rotary_tables_are_keyed_on_the_ids_alone():
    """FLUX rebuilds its rotary tables from the position ids every call; that memo is keyed on
    the ids only, so it hits at every new timestep while the timestep embedding's memo misses.
    An input over `max_key_numel` is never a key: what reads it stays live."""
    model = build_model("flux")
    kwargs = make_inputs("flux", model)
    optimized = ditopt.optimize(model, MEMO, example_inputs=kwargs)
    memos = {m.keys: m for m in _memos(optimized.programs[0])}
    ids = next(k for k in memos if "timestep" not in k and set(k) <= {"img_ids", "txt_ids"})
    timed = next(k for k in memos if "timestep" in k)
    assert {"aten.cos.default", "aten.sin.default"} <= _ops(memos[ids].head)
    assert not any("hidden_states" in k for k in memos)
    for m in memos.values():
        m.clear()
    with torch.no_grad():
        for t in (900.0, 500.0, 20.0):
            call = _with_timestep(kwargs, torch.full_like(kwargs["timestep"], t))
            torch.testing.assert_close(_first(optimized(**call)), _first(model(**call)), rtol=1e-4, atol=1e-5)
    assert (memos[ids].misses, memos[ids].hits) == (1, 2)
    assert (memos[timed].misses, memos[timed].hits) == (3, 0)

    small = {"name": "memo", "passes": [{"name": "conditioning_memo", "max_key_numel": kwargs["encoder_hidden_states"].numel() - 1}]}
    limited = ditopt.optimize(model, small, example_inputs=kwargs)
    assert "encoder_hidden_states" not in limited.report.passes[0].report["keys"]
    assert not any("encoder_hidden_states" in m.keys for m in _memos(limited.programs[0]))


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
    assert memos
    for m in memos:  # a memo on the timestep misses once per timestep; others once in all
        expected = (3, 3) if any(k in m.keys for k in ("timestep", "t")) else (1, 5)
        assert (m.misses, m.hits) == expected, (m.keys, m.misses, m.hits)


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
    assert all(m.misses == 2 for m in _memos(memo.programs[0]) if "timestep" in m.keys)


def test_does_not_fire_without_a_conditioning_only_computation():
    """The toy DiT uses the raw timestep (t * w): no op depends on the conditioning alone, so
    there is nothing to remember and the graph is returned unchanged."""
    model = AffineDiT().eval()
    optimized = ditopt.optimize(model, MEMO, example_inputs=toy_inputs())
    record = optimized.report.passes[0]
    assert not record.modified
    assert "no segment computes >= 4 ops from ['timestep'] alone" in record.report["reason"]
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
    optimized = ditopt.optimize(model, {"name": "memo", "budget": {"max_rel_err": 1.0}, "passes": [{"name": "conditioning_memo"}]},
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


def test_memory_stays_within_max_bytes_when_every_call_brings_a_new_prompt():
    """A server sees a new prompt per request: the memo keyed on the text must drop old entries
    to stay within `max_bytes` instead of growing to `max_entries`, and stay exact."""
    model = build_model("flux")
    kwargs = make_inputs("flux", model)
    probe = ditopt.optimize(model, MEMO, example_inputs=kwargs)
    text = next(m for m in _memos(probe.programs[0]) if m.keys == ("encoder_hidden_states",))
    entry = text.nbytes // max(len(text._memo), 1)  # filled by optimize's verification calls
    assert entry > 0
    budget = 2 * entry + entry // 2  # room for two prompts' entries
    optimized = ditopt.optimize(model, {"name": "memo", "passes": [{"name": "conditioning_memo", "max_bytes": budget}]},
                                example_inputs=kwargs)
    memos = _memos(optimized.programs[0])
    text = next(m for m in memos if m.keys == ("encoder_hidden_states",))
    with torch.no_grad():
        for seed in range(6):
            prompt = torch.randn(kwargs["encoder_hidden_states"].shape, generator=torch.Generator().manual_seed(seed))
            call = {**kwargs, "encoder_hidden_states": prompt}
            torch.testing.assert_close(_first(optimized(**call)), _first(model(**call)), rtol=1e-4, atol=1e-5)
            assert all(m.nbytes <= budget for m in memos)
    assert len(text._memo) == 2 and text.misses >= 6


def test_value_key_reads_a_one_element_view_of_an_expanded_tensor():
    """The half-batch call of a one-sample CFG batch holds timestep[1:] of an expanded scalar:
    one element with stride 0, which a bytes view of .contiguous() rejected (the demo failed)."""
    from ditopt.passes.conditioning_memo import value_key

    half = torch.tensor(7).expand(2)[1:]
    assert value_key(half) == value_key(torch.tensor([7]))
    assert value_key(half) != value_key(torch.tensor([8]))
