"""Capture recovers the DiT structure from the graph on six architectures."""

from __future__ import annotations

import torch
from conftest import build_model, make_inputs

from ditopt import capture
from ditopt.capture import nodes_with_role

EXPECTED = {
    # arch: (blocks, streams, attention kinds of block 0, image tokens, text tokens)
    "dit": (2, {"single"}, ["self"], 16, 0),
    "pixart": (2, {"single"}, ["self", "cross"], 16, 8),
    "sd3": (2, {"dual"}, ["joint"], 16, 8),
    "flux": (3, {"dual", "single"}, ["joint"], 64, 8),
    "wan": (2, {"single"}, ["self", "cross"], 32, 8),
    "plain": (3, {"single"}, ["self"], 16, 0),
}


def test_structure_recovered(arch):
    model = build_model(arch)
    graph = capture(model, make_inputs(arch, model))
    n_blocks, streams, kinds, img, txt = EXPECTED[arch]
    assert len(graph.blocks) == n_blocks
    assert [s.kind for s in graph.segments] == ["prologue"] + ["block"] * n_blocks + ["epilogue"]
    assert {b.stream for b in graph.blocks} == streams
    assert [a.kind for a in graph.blocks[0].attention] == kinds
    assert graph.image_tokens == img and graph.text_tokens == txt
    for block in graph.blocks:
        assert block.parameters > 0
        assert block.ffn and all(f.hidden_features > f.in_features for f in block.ffn)
        for site in block.attention:
            assert site.q and site.k and site.v and site.out
            assert site.image_tokens + (site.text_tokens if site.kind == "joint" else 0) == site.query_tokens
    # Every node of a block segment is annotated, and the roles name the real projections.
    seg = graph.segment_for_block(0)
    for node in seg.module.graph.nodes:
        if node.op == "call_function":
            assert node.meta["ditopt"]["block"] == 0
    roles = {n.meta["ditopt"]["role"] for n in nodes_with_role(seg, "attn0")}
    assert {"attn0.op", "attn0.out"} <= roles and any(r.startswith("attn0.q") for r in roles)
    assert all(n.target == torch.ops.aten.linear.default for n in nodes_with_role(seg, "attn0.q"))


def test_block_modules_follow_model_lists():
    model = build_model("flux")
    graph = capture(model, make_inputs("flux", model))
    assert [b.module for b in graph.blocks] == [
        "transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"
    ]
    assert graph.grid == (8, 8)
    joint = graph.blocks[0].attention[0]
    assert joint.kind == "joint" and joint.text_first and len(joint.q) == 2


def test_modulation_found_for_adaln_blocks():
    for arch in ("dit", "sd3", "flux", "plain"):
        model = build_model(arch)
        graph = capture(model, make_inputs(arch, model))
        assert all(b.modulation for b in graph.blocks), arch


def test_capture_is_exact_and_does_not_touch_model():
    model = build_model("dit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = make_inputs("dit", model, batch=2)
    graph = capture(model, kwargs)
    import torch.utils._pytree as pytree

    env = graph.bind(pytree.tree_flatten(((), kwargs))[0])
    out = graph.collect_outputs(graph.run_segments(env))
    ref = model(**kwargs)
    assert type(out) is type(ref)
    assert torch.equal(out.sample, ref.sample)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_structure_hash_changes_with_shape():
    model = build_model("plain")
    a = capture(model, make_inputs("plain", model, batch=1))
    b = capture(model, make_inputs("plain", model, batch=2))
    assert a.structure_hash() == capture(model, make_inputs("plain", model, batch=1)).structure_hash()
    assert a.structure_hash() != b.structure_hash()


def _identity_nodes(gm: torch.fx.GraphModule) -> list[str]:
    from ditopt.capture import _is_identity

    return [n.name for n in gm.graph.nodes if _is_identity(n)]


def test_identity_ops_are_dropped_and_the_output_stays_bitwise(arch):
    import torch.utils._pytree as pytree

    model = build_model(arch)
    kwargs = make_inputs(arch, model, batch=2)
    with torch.no_grad():
        exported = torch.export.export(model, (), kwargs, strict=False).module()
    graph = capture(model, kwargs)
    if arch == "dit":  # diffusers' attention output: / rescale_output_factor (1.0), then eval dropout
        kinds = {n.target for n in exported.graph.nodes if n.name in _identity_nodes(exported)}
        assert {torch.ops.aten.div.Tensor, torch.ops.aten.dropout.default} <= kinds
    for seg in graph.segments:
        assert _identity_nodes(seg.module) == [], seg.name
    env = graph.bind(pytree.tree_flatten(((), kwargs))[0])
    out = graph.collect_outputs(graph.run_segments(env))
    with torch.no_grad():
        ref = model(**kwargs)
    first = lambda o: o if isinstance(o, torch.Tensor) else o[0] if isinstance(o, tuple) else o.sample  # noqa: E731
    assert torch.equal(first(out), first(ref))


def test_ops_that_change_a_value_or_dtype_are_kept():
    from ditopt.capture import drop_identity_ops

    class Ops(torch.nn.Module):
        def forward(self, x, labels):
            scaled = x / 2.0 + x * 1.5  # not by one
            as_float = labels / 1  # integer tensor: the result is float, not labels
            dropped = torch.nn.functional.dropout(x, 0.5, training=True)  # a real dropout
            kept = torch.nn.functional.dropout(x, 0.0, training=True) * 1  # p = 0, then * 1: identities
            return scaled + as_float[:, None] + dropped * 0 + kept

    x, labels = torch.randn(2, 3), torch.tensor([1, 2])
    gm = torch.export.export(Ops(), (x, labels), strict=False).module()
    before = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert drop_identity_ops(gm) == 2
    after = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert after.count(torch.ops.aten.div.Tensor) == before.count(torch.ops.aten.div.Tensor) == 2
    assert after.count(torch.ops.aten.dropout.default) == 1 and after.count(torch.ops.aten.mul.Tensor) == 2
    torch.manual_seed(0)
    out = gm(x, labels)
    expected = x / 2.0 + x * 1.5 + (labels / 1)[:, None] + x
    assert torch.equal(out, expected)


def test_remove_unused_keeps_writes_that_are_read_and_drops_the_others():
    # Wan's rotary embedding: out = empty_like(x); out[..., 0::2] = a; out[..., 1::2] = b; read out.
    import torch.fx as fx

    from ditopt.graph import remove_unused

    class Rotary(torch.nn.Module):
        def forward(self, x):
            out = torch.empty_like(x)
            out[..., 0::2] = x[..., 0::2] * 2
            out[..., 1::2] = x[..., 1::2] + 1
            spare = torch.empty_like(x)
            spare[..., 0::2] = x[..., 0::2]  # written, never read
            return out * 1.0

    x = torch.randn(3, 8)
    gm = torch.export.export(Rotary(), (x,)).module()
    graph = gm.graph
    copies = [n for n in graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert len(copies) == 3
    remove_unused(graph)
    kept = [n for n in graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert len(kept) == 2  # the spare buffer's write went with it
    torch.testing.assert_close(fx.GraphModule(gm, graph)(x), Rotary()(x))
