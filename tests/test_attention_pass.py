"""Attention substitution: the calibration collector's mass numbers, and the neighbourhood /
block-sparse passes (graph before and after, numerics against dense and masked-dense
references, must-not-fire cases, idempotence)."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

from conftest import build_model, make_inputs
from ditopt.calibration import CalibStats, calibrate
from ditopt.capture import capture
from ditopt.kernels.layout import inverse_tile_permutation, tile_permutation
from ditopt.kernels.neighborhood import neighborhood_mask
from ditopt.registry import PassContext, get_pass
from ditopt.passes.attention import attention_heatmap, attention_masses
from ditopt.passes.attention.collector import RADII, RHOS
from ditopt.passes.attention.rewrite import replace_attention

# Ops by name: the OpOverload objects of custom ops can be re-created when their library reloads.
SDPA = "aten.scaled_dot_product_attention.default"
NEIGHBORHOOD = "ditopt.neighborhood_attention.default"
BLOCK_SPARSE = "ditopt.block_sparse_attention.default"


# -- collector: hand-constructed q/k -------------------------------------------------------------
def test_uniform_attention_keeps_the_window_share():
    # q = 0: every query spreads its mass evenly over all keys. On an 8x8 grid with 2x2 tiles
    # (4x4 tiles), radius 1 is a clamped 3x3-tile window: 36 of 64 image keys for every query;
    # radius >= 2 (5 > 4 tiles) is the whole grid. Text keys (4) always count as kept.
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(1, 2, 68, 8)
    k, v = torch.randn(1, 2, 68, 8, generator=g), torch.randn(1, 2, 68, 8, generator=g)
    window, blocks = attention_masses(q, k, v, (8, 8), 2, RADII, RHOS, text_tokens=4)
    assert torch.allclose(window, torch.tensor([40 / 68, 1.0, 1.0]).expand(2, 3), atol=1e-6)
    # 16 key blocks of 4 tokens; rho 0.125 / 0.25 / 0.5 keep 2 / 4 / 8 blocks.
    assert torch.allclose(blocks, torch.tensor([12 / 68, 20 / 68, 36 / 68]).expand(2, 3), atol=1e-6)


def test_peaked_attention_is_kept_only_when_its_key_is_in_the_window():
    # Every query attends (almost) only to the image token at grid (0, 0).
    q = torch.ones(1, 1, 64, 4)
    k = torch.zeros(1, 1, 64, 4)
    k[0, 0, 0] = 40.0  # row-major token 0 = grid (0, 0)
    v = torch.randn(1, 1, 64, 4)
    pos = {int(p): i for i, p in enumerate(tile_permutation(8, 8, 2))}  # row-major -> tile-major position
    near, far = pos[1 * 8 + 1], pos[7 * 8 + 7]
    window, blocks = attention_masses(q, k, v, (8, 8), 2, (1,), (0.125,), query_rows=torch.tensor([near]))
    assert window.item() == pytest.approx(1.0, abs=1e-6)
    assert blocks.item() == pytest.approx(1.0, abs=1e-6)  # (1, 1) shares the (0, 0) block: the diagonal block is kept
    window, _ = attention_masses(q, k, v, (8, 8), 2, (1,), (0.125,), query_rows=torch.tensor([far]))
    assert window.item() == pytest.approx(0.0, abs=1e-6)


def test_text_last_order_is_handled():
    # Same uniform case with text tokens after the image tokens.
    q = torch.zeros(1, 1, 68, 8)
    k = torch.randn(1, 1, 68, 8)
    window, _ = attention_masses(q, k, k, (8, 8), 2, (1,), (0.5,), text_tokens=4, text_first=False)
    assert window.item() == pytest.approx(40 / 68, abs=1e-6)


# -- fixtures ---------------------------------------------------------------------------------------
def tiny_dit():
    """Diffusers DiT on an 8x8 patch grid (sample 16, patch 2), 2 blocks, 2 heads."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
    ).eval()
    g = torch.Generator().manual_seed(1)
    kwargs = {
        "hidden_states": torch.randn(1, 4, 16, 16, generator=g),
        "timestep": torch.tensor([500]),
        "class_labels": torch.tensor([3]),
    }
    return model, kwargs


def bucket_stats(graph, masses: dict[int, list[float]], num_steps: int, step_buckets=None) -> CalibStats:
    """Stats whose per-step-bucket mass of block b is masses[b][bucket] (every head, radius, rho)."""
    blocks, heads = len(graph.blocks), max(s.heads for b in graph.blocks for s in b.attention)
    tensors = {}
    for tile in (2, 4, 8):
        for key, n in (("window_mass", len(RADII)), ("block_mass", len(RHOS))):
            t = torch.empty(3, blocks, heads, n)
            for b in range(blocks):
                for i, m in enumerate(masses[b]):
                    t[i, b] = m
            tensors[f"attention.{key}_by_step.tile{tile}"] = t
            tensors[f"attention.{key}.tile{tile}"] = t.mean(0)
    meta = {"attention": {"step_buckets": step_buckets}} if step_buckets else {}
    return CalibStats(graph.structure_hash(), graph.model_class, num_steps, [0.0] * num_steps, tensors, meta)


def hand_stats(graph, mass: float | dict[int, float]) -> CalibStats:
    """Calibration stats saying every head of block b keeps `mass[b]` at every radius / rho."""
    per_block = {b: [mass if isinstance(mass, float) else mass.get(b, 0.5)] * 3 for b in range(len(graph.blocks))}
    return bucket_stats(graph, per_block, 3)


def run_graph(graph, kwargs):
    leaves, _ = pytree.tree_flatten(((), kwargs))
    out = graph.collect_outputs(graph.run_segments(graph.bind(leaves)))
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def reference(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def ops_in(segment):
    return [str(n.target) for n in segment.module.graph.nodes if n.op == "call_function" and str(n.target) in (SDPA, NEIGHBORHOOD, BLOCK_SPARSE)]


def apply(name, graph, stats, **config):
    # The toy models' 4-16-token blocks cost more than dense attention (see the cost-guard test):
    # most tests here check the rewrite itself, so the guard is off unless a test sets it.
    config.setdefault("max_cost", None)
    spec = get_pass(name)
    return spec.apply(graph, spec.config(**config), PassContext(model=None, stats=stats))


# -- pass: graph before / after -------------------------------------------------------------------
def test_only_calibrated_local_blocks_are_rewritten():
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    result = apply("neighborhood_attention", graph, hand_stats(graph, {1: 0.99}), tile=2, min_mass=0.95)
    assert result.modified
    assert ops_in(graph.segment_for_block(0)) == [SDPA] and ops_in(graph.segment_for_block(1)) == [SDPA]  # input untouched
    assert ops_in(result.graph.segment_for_block(0)) == [SDPA]
    assert ops_in(result.graph.segment_for_block(1)) == [NEIGHBORHOOD]
    assert result.graph.segment_for_block(0).module is graph.segment_for_block(0).module
    assert result.report["substituted"] == [1]
    layer = result.report["layers"][0]
    assert layer["radius"] == 1 and layer["tile"] == 2 and layer["density"] == pytest.approx(36 / 64)
    assert result.report["dense"][0]["block"] == 0 and "broad" in result.report["dense"][0]["reason"]
    assert result.report["predicted_attention_flop_saving"] == pytest.approx(0.5 * (1 - 36 / 64))
    assert result.report["chosen_by"].startswith("calibrated mass") and result.replay is None  # no budget: no search


def tile_stats(graph, window_mass: dict[int, list[float]], num_steps: int = 3) -> CalibStats:
    """Stats whose window mass at tile t and radius RADII[i] is window_mass[t][i] in every block and head."""
    blocks, heads = len(graph.blocks), max(s.heads for b in graph.blocks for s in b.attention)
    tensors = {}
    for tile, masses in window_mass.items():
        t = torch.tensor(masses).expand(1, blocks, heads, len(RADII)).clone()
        tensors[f"attention.window_mass_by_step.tile{tile}"] = t
        tensors[f"attention.window_mass.tile{tile}"] = t.mean(0)
    meta = {"attention": {"tiles": sorted(window_mass), "step_buckets": [[0, num_steps]]}}
    return CalibStats(graph.structure_hash(), graph.model_class, num_steps, [0.0] * num_steps, tensors, meta)


@pytest.mark.parametrize("tile4_mass, expected", [
    ([0.99, 1.0, 1.0], 4),   # local at 4x4 tiles: a 3x3-tile window keeps 9 of 64 tiles
    ([0.5, 0.99, 1.0], 8),   # needs radius 2 at 4x4 tiles (25 of 64 tiles): too slow per multiply-add
    ([0.5, 0.6, 0.7], 8),    # broad at 4x4 tiles
])
def test_auto_tile_keeps_the_fewest_weighted_multiply_adds(tile4_mass, expected):
    import diffusers

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=1,
        sample_size=32, patch_size=1, num_embeds_ada_norm=10, norm_num_groups=1).eval()
    kwargs = {"hidden_states": torch.randn(1, 1, 32, 32), "timestep": torch.tensor([500]), "class_labels": torch.tensor([3])}
    graph = capture(model, kwargs)
    assert graph.grid == (32, 32)
    stats = tile_stats(graph, {4: tile4_mass, 8: [0.99, 1.0, 1.0]})
    result = apply("neighborhood_attention", graph, stats, max_cost=0.9)
    assert result.modified and result.report["tile"] == expected
    assert result.report["layers"][0]["tile"] == expected and result.report["layers"][0]["radius"] == 1
    # A tile the calibration did not measure is never picked.
    only8 = apply("neighborhood_attention", graph, tile_stats(graph, {8: [0.99, 1.0, 1.0]}), max_cost=0.9)
    assert only8.report["tile"] == 8


def test_window_covering_the_grid_equals_dense():
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    # 4x4 tiles on an 8x8 grid: 2x2 tiles, a radius-1 window is the whole grid.
    result = apply("neighborhood_attention", graph, hand_stats(graph, 1.0), tile=4, radius=1)
    assert result.report["substituted"] == [0, 1]
    torch.testing.assert_close(run_graph(result.graph, kwargs), reference(model, kwargs), atol=1e-5, rtol=1e-5)


def test_local_window_matches_masked_dense_attention(monkeypatch):
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    result = apply("neighborhood_attention", graph, hand_stats(graph, 1.0), tile=2, radius=1)
    assert result.report["substituted"] == [0, 1]
    out = run_graph(result.graph, kwargs)
    # Reference: the original model with every attention masked to the same window, in row-major order.
    inv = inverse_tile_permutation(8, 8, 2)
    mask = neighborhood_mask(8, 8, 2, 1)[inv][:, inv]
    dense_sdpa = torch.nn.functional.scaled_dot_product_attention

    def masked(q, k, v, *args, **kw):
        return dense_sdpa(q, k, v, attn_mask=mask)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", masked)
    expected = reference(model, kwargs)
    monkeypatch.undo()
    dense = reference(model, kwargs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - dense).abs().max() > 1e-4  # the window is genuinely local


def test_joint_attention_keeps_text_global():
    model = build_model("flux")
    kwargs = make_inputs("flux", model, resolution=8)
    graph = capture(model, kwargs)
    assert graph.grid == (8, 8) and all(s.kind == "joint" for b in graph.blocks for s in b.attention)
    result = apply("neighborhood_attention", graph, hand_stats(graph, 1.0), tile=4, radius=1)
    assert len(result.report["substituted"]) == len(graph.blocks)
    assert all(l["kind"] == "joint" for l in result.report["layers"])
    torch.testing.assert_close(run_graph(result.graph, kwargs), reference(model, kwargs), atol=1e-5, rtol=1e-5)


def test_block_sparse_with_every_block_kept_equals_dense():
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    result = apply("block_sparse_attention", graph, hand_stats(graph, 1.0), tile=2, rho=0.5)
    assert [ops_in(s) for s in result.graph.block_segments] == [[BLOCK_SPARSE], [BLOCK_SPARSE]]
    assert result.report["layers"][0]["density"] == pytest.approx(0.5)
    out = run_graph(result.graph, kwargs)
    assert (out - reference(model, kwargs)).abs().max() > 0  # it does drop blocks ...
    # ... and with rho = 1 every block is computed exactly: dense attention.
    g = graph
    for b in graph.blocks:
        record = {"pattern": "block_sparse", "tile": 2, "rho": 1.0, "density": 1.0}
        g = replace_attention(g, b.index, b.attention[0], torch.ops.ditopt.block_sparse_attention.default, lambda n, s: (4, 1.0, n, True, s, 1e-6, True), record)
    torch.testing.assert_close(run_graph(g, kwargs), reference(model, kwargs), atol=1e-5, rtol=1e-5)


# -- must not fire ----------------------------------------------------------------------------------
def test_broad_attention_stays_dense():
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    for name in ("neighborhood_attention", "block_sparse_attention"):
        result = apply(name, graph, hand_stats(graph, 0.6), tile=2)
        assert not result.modified and result.report["substituted"] == []
        assert all(ops_in(s) == [SDPA] for s in result.graph.block_segments)


def test_a_substitute_costing_more_than_dense_attention_is_refused():
    from torch.utils.flop_counter import FlopCounterMode

    from ditopt.passes.attention.substitution import substitute_cost

    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    site = graph.blocks[0].attention[0]
    # PISA on 4-token blocks with 16-dim heads: its compensation alone is ~2x dense attention.
    pisa = apply("block_sparse_attention", graph, hand_stats(graph, 1.0), tile=2, rho=0.5, max_cost=0.9)
    assert not pisa.modified and pisa.report["substituted"] == []
    assert all("nothing to save" in d["reason"] for d in pisa.report["dense"])
    # A 3x3-tile window on a 4x4-tile grid keeps 36 of 64 keys per query: cheaper, so it fires.
    na = apply("neighborhood_attention", graph, hand_stats(graph, 1.0), tile=2, radius=1, max_cost=0.9)
    assert na.report["substituted"] == [0, 1]
    assert na.report["layers"][0]["cost"] == pytest.approx(36 / 64)
    # The guard's count is the flop counter's count of the op as it runs.
    q = torch.randn(1, site.heads, site.query_tokens, site.head_dim)
    record = {"pattern": "block_sparse", "block_size": 4, "rho": 0.5, "compensate": True}
    with FlopCounterMode(display=False) as counter:
        torch.ops.ditopt.block_sparse_attention(q, q, q, 4, 0.5, 0, True, None, 1e-6, True)
    dense_flops = 4 * site.heads * site.query_tokens ** 2 * site.head_dim
    assert substitute_cost(site, record) == pytest.approx(counter.get_total_flops() / dense_flops)
    assert substitute_cost(site, record) > 1.0


def test_cross_attention_is_never_substituted():
    model = build_model("pixart")
    kwargs = make_inputs("pixart", model, resolution=16)
    graph = capture(model, kwargs)
    result = apply("neighborhood_attention", graph, hand_stats(graph, 1.0), tile=2, radius=1)
    kinds = {d["kind"] for d in result.report["dense"]}
    assert kinds == {"cross"} and len(result.report["substituted"]) == len(graph.blocks)
    for seg in result.graph.block_segments:
        assert sorted(ops_in(seg)) == sorted([NEIGHBORHOOD, SDPA])  # self replaced, cross kept


def test_without_a_2d_grid_nothing_fires():
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs).evolve(grid=None)
    result = apply("neighborhood_attention", graph, hand_stats(graph, 1.0), tile=2, radius=1)
    assert not result.modified and all("grid" in d["reason"] for d in result.report["dense"])


def test_applying_twice_changes_nothing_more():
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    stats = hand_stats(graph, 1.0)
    once = apply("neighborhood_attention", graph, stats, tile=2, radius=1)
    twice = apply("neighborhood_attention", once.graph, stats, tile=2, radius=1)
    assert not twice.modified
    assert [s.module.code for s in twice.graph.segments] == [s.module.code for s in once.graph.segments]
    assert twice.report["substituted"] == once.report["substituted"]
    other = apply("block_sparse_attention", once.graph, stats, tile=2)
    assert not other.modified  # an attention already substituted is left alone


# -- collector on a real calibration run ----------------------------------------------------------
def test_collector_over_a_sampling_loop(tmp_path):
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)

    def sample(m):
        x = kwargs["hidden_states"].clone()
        for t in (900, 600, 300):
            out = m(hidden_states=x, timestep=torch.tensor([t]), class_labels=kwargs["class_labels"])
            x = x - 0.1 * (out[0] if isinstance(out, (tuple, list)) else out.sample)[:, :4]
        return x

    stats = calibrate(model, graph, ["attention"], sample)
    meta = stats.meta["attention"]
    assert meta["tiles"] == [2, 4] and meta["blocks"] == [0, 1] and meta["step_buckets"] == [[0, 1], [1, 2], [2, 3]]
    window = stats.tensors["attention.window_mass.tile2"]
    assert window.shape == (2, 2, 3) and stats.tensors["attention.window_mass_by_step.tile2"].shape == (3, 2, 2, 3)
    assert stats.tensors["attention.block_mass.tile2"].shape == (2, 2, 3)
    assert ((window > 0) & (window <= 1 + 1e-6)).all()
    assert (window[..., 1:] >= window[..., :1] - 1e-6).all()  # larger windows keep more
    assert torch.allclose(stats.tensors["attention.window_mass.tile4"], torch.ones(2, 2, 3))  # window = whole grid
    # Recording does not change results: the calibration's samples equal the plain model's.
    with torch.no_grad():
        torch.testing.assert_close(stats.reference_samples, sample(model))
    png = attention_heatmap(stats, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").stat().st_size > 1000 and png.endswith(".png")
    # `ditopt optimize --report R` writes it next to the report (the family registers it as a
    # report figure; the CLI writes whatever is registered), only when attention was measured
    from PIL import Image

    from ditopt.cli import write_report_figures
    from ditopt.passes.attention.collector import substituted_tile

    nothing_chosen = {"passes": []}
    assert write_report_figures(stats, tmp_path / "r.json", nothing_chosen) == [("attention heatmap", tmp_path / "r.attention.png")]
    assert (tmp_path / "r.attention.png").stat().st_size > 1000
    assert write_report_figures(None, tmp_path / "s.json", nothing_chosen) == [] and not (tmp_path / "s.attention.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.png", "r.attention.png"]  # no temp files left
    # It draws the tile the pass chose (when measured), not the grid's default.
    chose4 = {"passes": [{"name": "caching", "applied": True, "report": {}},
                         {"name": "neighborhood_attention", "applied": True, "report": {"tile": 4}}]}
    assert substituted_tile(chose4) == 4 and substituted_tile(nothing_chosen) is None
    assert Image.open(tmp_path / "r.attention.png").text["Title"] == "attention mass kept, tile 2"
    write_report_figures(stats, tmp_path / "r.json", chose4)
    assert Image.open(tmp_path / "r.attention.png").text["Title"] == "attention mass kept, tile 4"
    chose8 = {"passes": [{"name": "neighborhood_attention", "applied": True, "report": {"tile": 8}}]}
    write_report_figures(stats, tmp_path / "r.json", chose8)  # not measured: the default tile
    assert Image.open(tmp_path / "r.attention.png").text["Title"] == "attention mass kept, tile 2"
    # Stats without attention measurements (hand-made, or a model without a 2-D grid) draw nothing.
    assert write_report_figures(hand_stats(graph, 1.0), tmp_path / "t.json", nothing_chosen) == []


def test_the_cli_writes_whatever_figures_are_registered(tmp_path, monkeypatch):
    from ditopt import registry
    from ditopt.cli import write_report_figures

    registry.load_plugins()
    seen = []

    def draw(stats, report, path):
        seen.append((stats, report))
        path.write_text("figure")
        return path

    monkeypatch.setitem(registry._REPORT_FIGURES, "test figure", registry.ReportFigure("test figure", ".test.txt", draw))
    written = write_report_figures("stats", tmp_path / "r.json", {"passes": []})
    assert ("test figure", tmp_path / "r.test.txt") in written and seen == [("stats", {"passes": []})]
    assert (tmp_path / "r.test.txt").read_text() == "figure"
    with pytest.raises(ValueError, match="already used"):
        registry.register_report_figure("another", ".test.txt")(draw)


@pytest.mark.parametrize("arch", ["dit", "flux"])
def test_reordering_tokens_once_matches_permuting_per_layer(arch):
    if arch == "dit":
        model, kwargs = tiny_dit()
    else:
        model = build_model("flux")
        kwargs = make_inputs("flux", model, resolution=8)
    graph = capture(model, kwargs)
    stats = hand_stats(graph, 1.0)
    once = apply("neighborhood_attention", graph, stats, tile=2, radius=1, reorder="once")
    per_layer = apply("neighborhood_attention", graph, stats, tile=2, radius=1, reorder="per_layer")
    assert once.report["token_order"]["tile"] == 2 and "row-major" in per_layer.report["token_order"]
    if arch == "flux":  # RoPE tables move with the tokens
        assert {"to_10", "to_11"} <= set(once.report["token_order"]["prologue_outputs"])

    def gathers(result):
        return [sum("index_select" in str(n.target) for n in s.module.graph.nodes) for s in result.graph.block_segments]

    assert set(gathers(once)) == {0} and set(gathers(per_layer)) == {4}  # q, k, v in; result out
    torch.testing.assert_close(run_graph(once.graph, kwargs), run_graph(per_layer.graph, kwargs), atol=1e-6, rtol=1e-6)
    # A later substitution with another tile composes its own order with the tile-major one it finds.
    first = apply("neighborhood_attention", graph, stats, tile=2, radius=1, reorder="once", blocks=(0,))
    mixed = apply("block_sparse_attention", first.graph, stats, tile=4, rho=0.5, blocks=(1,))
    plain = apply("neighborhood_attention", graph, stats, tile=2, radius=1, reorder="per_layer", blocks=(0,))
    plain = apply("block_sparse_attention", plain.graph, stats, tile=4, rho=0.5, reorder="per_layer", blocks=(1,))
    assert mixed.report["substituted"] == [1] and mixed.report["token_order"]["tile"] == 2
    torch.testing.assert_close(run_graph(mixed.graph, kwargs), run_graph(plain.graph, kwargs), atol=1e-5, rtol=1e-5)


def test_preset_and_rollback_when_over_the_error_budget():
    from ditopt import optimize
    from ditopt.profiles import load_profile

    preset = load_profile("balanced-attention")
    assert [p.name for p in preset.passes] == ["neighborhood_attention"] and preset.passes[0].config.min_mass == 0.95
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    profile = {
        "name": "strict", "budget": {"max_rel_err": 1e-9},
        "passes": [{"name": "neighborhood_attention", "tile": 2, "radius": 1}],
    }
    optimized = optimize(model, profile, example_inputs=kwargs, stats=hand_stats(graph, 1.0))
    record = optimized.report.passes[0]
    assert record.modified and not record.applied  # the optimizer verified it and rolled it back
    assert record.verification["max_rel_err"] > 1e-9
    with torch.no_grad():
        torch.testing.assert_close(optimized(**kwargs)[0], reference(model, kwargs))


# -- dense steps: the original attention on the first steps of every generation ---------------------

def runtime(model, kwargs, graph):
    from ditopt.runtime import OptimizedDiT

    return OptimizedDiT(model, lambda call: pytest.fail("no other shape is used"), first=(kwargs, graph))


def sample_steps(opt, kwargs, timesteps=(900, 600, 300, 100)):
    """One output per step of one generation (decreasing timesteps), plus what each call ran."""
    outs, records = [], []
    with torch.no_grad():
        for t in timesteps:
            out = opt(**{**kwargs, "timestep": torch.tensor([t])})
            outs.append(out[0] if isinstance(out, (tuple, list)) else out.sample)
            records.append(opt.last_record)
    return outs, records


def test_dense_steps_keep_the_original_block_as_a_variant_picked_on_early_steps():
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    stats = hand_stats(graph, {1: 0.99})
    default = apply("neighborhood_attention", graph, stats, tile=2)
    assert default.graph.early_steps == () and [s.name for s in default.graph.segments] == [s.name for s in graph.segments]
    result = apply("neighborhood_attention", graph, stats, tile=2, dense_steps=2)
    g = result.graph
    assert graph.early_steps == () and "block.1:dense" not in [s.name for s in graph.segments]  # input untouched
    dense = g.segment("block.1:dense")
    assert dense.kind == "variant" and dense.block == 1 and (dense.inputs, dense.outputs) == (g.segment("block.1").inputs, g.segment("block.1").outputs)
    assert ops_in(dense) == [SDPA] and ops_in(g.segment("block.1")) == [NEIGHBORHOOD]
    assert "block.0:dense" not in [s.name for s in g.segments]  # block 0 stays dense anyway: no variant
    assert [(r.block, r.steps) for r in g.early_steps] == [(1, 2)]
    # The step decides which version runs under the segment's own name.
    for step in (0, 1):
        assert ops_in(g.at_step(step).segment("block.1")) == [SDPA]
    assert g.at_step(2) is g and ops_in(g.at_step(2).segment("block.1")) == [NEIGHBORHOOD]
    assert g.at_step(0).plan == g.plan  # the plan is untouched (caching passes still see plain block stages)
    layer = result.report["layers"][0]
    assert layer["block"] == 1 and layer["dense_steps"] == 2 and default.report["layers"][0]["dense_steps"] == 0
    # 2 of the 3 calibrated steps dense: block 1 saves a third of what it saves substituted at every step.
    assert result.report["predicted_attention_flop_saving"] == pytest.approx(default.report["predicted_attention_flop_saving"] / 3)
    assert g.summary()["early_steps"][0]["steps"] == 2 and g.structure_hash() != default.graph.structure_hash()
    twice = apply("neighborhood_attention", g, stats, tile=2, dense_steps=2)
    assert not twice.modified and twice.report["layers"][0]["dense_steps"] == 2


@pytest.mark.parametrize("reorder", ["per_layer", "once"])
def test_dense_steps_equal_the_original_then_the_substituted_graph(reorder):
    from ditopt.verify import run_graph_once

    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    stats = hand_stats(graph, 1.0)
    mixed = apply("neighborhood_attention", graph, stats, tile=2, radius=1, reorder=reorder, dense_steps=2).graph
    always = apply("neighborhood_attention", graph, stats, tile=2, radius=1, reorder=reorder).graph
    opt = runtime(model, kwargs, mixed)
    outs, records = sample_steps(opt, kwargs)
    original, _ = sample_steps(runtime(model, kwargs, graph), kwargs)
    substituted, _ = sample_steps(runtime(model, kwargs, always), kwargs)
    assert [r.get("early_steps") for r in records] == [[0, 1], [0, 1], None, None]
    for step in (0, 1):
        if reorder == "per_layer":  # the very graph that was captured
            assert torch.equal(outs[step], original[step])
        torch.testing.assert_close(outs[step], original[step], atol=1e-6, rtol=0)
        torch.testing.assert_close(outs[step], reference(model, {**kwargs, "timestep": torch.tensor([(900, 600)[step]])}), atol=1e-5, rtol=1e-5)
        assert (outs[step] - substituted[step]).abs().max() > 1e-3
    for step in (2, 3):
        torch.testing.assert_close(outs[step], substituted[step], atol=1e-6, rtol=0)
    # A new generation (larger timestep) starts dense again.
    again, records = sample_steps(opt, kwargs, (900,))
    assert records[0]["early_steps"] == [0, 1]
    torch.testing.assert_close(again[0], original[0], atol=1e-6, rtol=0)
    # The per-call verification measures the substituted version (the one that can be off).
    torch.testing.assert_close(run_graph_once(mixed, kwargs)[0], run_graph(always, kwargs), atol=1e-6, rtol=0)


def test_dense_steps_covering_every_calibrated_step_substitute_nothing():
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    for name in ("neighborhood_attention", "block_sparse_attention"):
        result = apply(name, graph, hand_stats(graph, 1.0), tile=2, dense_steps=3)
        assert not result.modified and result.report["substituted"] == [] and result.graph.early_steps == ()
        assert all("covers all 3 calibrated steps" in d["reason"] for d in result.report["dense"])
        assert all(ops_in(s) == [SDPA] for s in result.graph.block_segments)


@pytest.mark.parametrize("name", ["neighborhood_attention", "block_sparse_attention"])
def test_auto_dense_steps_start_after_a_broad_first_bucket(name):
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    # Block 1 is broad only in the first third (steps 0-1 of 6); block 0 is broad throughout.
    stats = bucket_stats(graph, {0: [0.5, 0.5, 0.5], 1: [0.5, 0.99, 0.99]}, num_steps=6)
    everywhere = apply(name, graph, stats, tile=2)
    assert everywhere.report["substituted"] == []
    assert any(why in everywhere.report["dense"][1]["reason"] for why in ("broad", "not block-sparse"))
    assert apply(name, graph, stats, tile=2, dense_steps=1).report["substituted"] == []  # step 1 is still in the broad bucket
    fixed = apply(name, graph, stats, tile=2, dense_steps=2)
    assert fixed.report["substituted"] == [1] and fixed.report["layers"][0]["mass"] == pytest.approx(0.99)
    auto = apply(name, graph, stats, tile=2, dense_steps="auto")
    assert auto.report["substituted"] == [1]
    assert auto.report["layers"][0]["dense_steps"] == 2 and [(r.block, r.steps) for r in auto.graph.early_steps] == [(1, 2)]
    assert "tried [0, 2, 4]" in auto.report["dense"][0]["reason"]
    assert ops_in(auto.graph.at_step(1).segment("block.1")) == [SDPA]
    # The collector's own bucket boundaries win over an even split.
    uneven = bucket_stats(graph, {0: [0.5] * 3, 1: [0.5, 0.99, 0.99]}, num_steps=6, step_buckets=[[0, 1], [1, 3], [3, 6]])
    assert apply(name, graph, uneven, tile=2, dense_steps="auto").report["layers"][0]["dense_steps"] == 1
    # Broad in the last third too: no start works, the layer stays dense.
    late = bucket_stats(graph, {0: [0.5] * 3, 1: [0.99, 0.99, 0.5]}, num_steps=6)
    assert apply(name, graph, late, tile=2, dense_steps="auto").report["substituted"] == []


@pytest.mark.parametrize("cache", ["taylor_forecast", "residual_cache"])
def test_dense_steps_compose_with_caching_in_either_order(cache):
    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    stats = hand_stats(graph, 1.0)
    spec = get_pass(cache)

    def cached(g):
        result = spec.apply(g, spec.config(warmup=3, interval=2), PassContext(model=None, num_steps=4))
        assert result.modified
        return result.graph

    def attention(g, dense_steps):
        return apply("neighborhood_attention", g, stats, tile=2, radius=1, reorder="per_layer", dense_steps=dense_steps).graph

    first = cached(attention(graph, 2))  # the caching pass accepts the plan: its block stages are plain
    later = cached(graph)
    later = attention(later, 2)
    if cache == "taylor_forecast":  # feature forecasting runs `:record` copies of the blocks
        for g in (first, later):
            assert ops_in(g.segment("block.0:record")) == [NEIGHBORHOOD] and ops_in(g.segment("block.0:record:dense")) == [SDPA]
            assert ops_in(g.at_step(0).segment("block.0:record")) == [SDPA]
    outs, _ = sample_steps(runtime(model, kwargs, first), kwargs)
    swapped, _ = sample_steps(runtime(model, kwargs, later), kwargs)
    dense, _ = sample_steps(runtime(model, kwargs, cached(graph)), kwargs)
    sparse, _ = sample_steps(runtime(model, kwargs, cached(attention(graph, 0))), kwargs)
    for a, b in zip(outs, swapped):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for step in (0, 1):  # computed (warm-up) steps with the original attention
        torch.testing.assert_close(outs[step], dense[step], atol=1e-6, rtol=0)
    torch.testing.assert_close(outs[2], sparse[2], atol=1e-6, rtol=0)  # computed, substituted


def test_export_refuses_dense_steps(tmp_path):
    from ditopt.errors import ArtifactError
    from ditopt.export import export_artifact

    model, kwargs = tiny_dit()
    graph = capture(model, kwargs)
    g = apply("neighborhood_attention", graph, hand_stats(graph, 1.0), tile=2, radius=1, dense_steps=1).graph
    with pytest.raises(ArtifactError, match="dense_steps=0"):
        export_artifact(g, tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()


# -- under a PSNR budget: the one budget search picks the layers ----------------------------------
@pytest.fixture(scope="module")
def budgeted():
    """A 4-block DiT on an 8x8 grid, calibrated by hand: blocks 1, 3, 0 local (most local first),
    block 2 broad (below min_mass 0.95: never a candidate); a 3-step sampler of 2 seeds."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
    ).eval()
    kwargs = {"hidden_states": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)),
              "timestep": torch.tensor([500]), "class_labels": torch.tensor([3])}
    graph = capture(model, kwargs)
    stats = bucket_stats(graph, {0: [0.97] * 3, 1: [0.99] * 3, 2: [0.9] * 3, 3: [0.98] * 3}, 3)
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))

    def sample(m):  # batch 2: the search measures candidates at another shape than the example's
        x = x0.clone()
        for t in (900, 600, 300):
            x = x - 0.1 * m(hidden_states=x, timestep=torch.tensor([t, t]), class_labels=torch.tensor([3, 5]))[0][:, :4]
        return x

    return model, kwargs, graph, stats, sample


def optimize_under(budget_db, budgeted, name="neighborhood_attention", **config):
    from ditopt import optimize

    model, kwargs, _, stats, sample = budgeted
    profile = {"name": "budgeted", "budget": {"min_psnr_db": budget_db, "max_rel_err": 1.0},
               "passes": [{"name": name, "tile": 2, "max_cost": None, **config}]}
    return optimize(model, profile, example_inputs=kwargs, calibration=sample, stats=stats, on_gate_miss="return")


def test_a_psnr_budget_keeps_as_many_local_layers_as_it_allows(budgeted):
    from ditopt import profile_from_report
    from ditopt.profiles import Budget

    model, kwargs, graph, stats, _ = budgeted
    loose = optimize_under(20.0, budgeted, radius=1).report.passes[0]
    assert loose.applied and loose.report["chosen_by"] == "budget search"
    assert loose.report["candidates"] == [1, 3, 0]  # highest calibrated mass first; broad block 2 never one
    assert loose.report["substituted"] == [0, 1, 3] and loose.resolved["blocks"] == [0, 1, 3]
    assert [d["block"] for d in loose.report["dense"]] == [2] and "broad" in loose.report["dense"][0]["reason"]
    psnr = {t["setting"]: t["psnr_db"] for t in loose.report["trials"]}
    assert all(t["sampled"] for t in loose.report["trials"]) and loose.report["target_psnr_db"] == pytest.approx(20.5)
    assert loose.outcome.predicted_psnr_db == psnr["blocks [0, 1, 3]"] >= loose.outcome.target_psnr_db == 20.5
    # Tighter than all three candidates together measured, looser than the most local one alone:
    # the search must keep fewer layers (the target is the budget plus margin_db 0.5).
    assert psnr["blocks [0, 1, 3]"] < psnr["blocks [1]"]
    target = (psnr["blocks [0, 1, 3]"] + psnr["blocks [1]"]) / 2
    tight_run = optimize_under(target - 0.5, budgeted, radius=1)
    tight = tight_run.report.passes[0]
    assert tight.report["target_psnr_db"] == pytest.approx(target)
    assert tight.modified and 1 <= len(tight.report["substituted"]) < len(loose.report["substituted"])
    assert tight.report["predicted_psnr_db"] >= target and set(tight.report["substituted"]) <= {1, 3}
    left = [d for d in tight.report["dense"] if d["block"] != 2]
    assert left and all("left dense by the budget search" in d["reason"] for d in left)
    assert tight.report["predicted_attention_flop_saving"] < loose.report["predicted_attention_flop_saving"]
    # The resolved config replays the choice without searching (no evaluator here), to the same model.
    replay = profile_from_report(tight_run.report.to_dict()).passes[0]
    assert list(replay.config.blocks) == tight.report["substituted"] and replay.config.tile == 2
    spec = get_pass("neighborhood_attention")
    no_search = PassContext(model=model, stats=stats, budget=Budget(min_psnr_db=target - 0.5))
    replayed = spec.apply(graph, replay.config, no_search)
    assert replayed.report["chosen_by"] == "blocks as given" and replayed.report["substituted"] == tight.report["substituted"]
    assert [ops_in(s) for s in graph.block_segments] == [[SDPA]] * 4  # the input graph is untouched
    assert [ops_in(s) == [NEIGHBORHOOD] for s in replayed.graph.block_segments] == [b in tight.report["substituted"] for b in range(4)]
    with torch.no_grad():
        out = tight_run(**kwargs)[0]
    torch.testing.assert_close(run_graph(replayed.graph, kwargs), out, atol=1e-6, rtol=0)
    dense = reference(model, kwargs)
    assert 1e-5 < ((out - dense).norm() / dense.norm()).item() < 0.1  # substituted, and close to the original
    assert not spec.apply(replayed.graph, replay.config, no_search).modified  # applying it twice changes nothing


def test_under_a_budget_nothing_fires_where_no_layer_meets_it(budgeted):
    from ditopt.errors import CalibrationError
    from ditopt.profiles import Budget

    model, kwargs, graph, stats, _ = budgeted
    # The search runs (block-sparse too) and even the most local layer alone misses: every layer dense.
    record = optimize_under(200.0, budgeted, name="block_sparse_attention", rho=0.5).report.passes[0]
    assert not record.modified and record.report["substituted"] == [] and record.outcome is None
    assert [t["setting"] for t in record.report["trials"]] == ["blocks [1]"]  # the last rung, measured first
    assert "even the one layer of highest calibrated mass (block 1) misses" in record.report["skipped"]
    assert [d["block"] for d in record.report["dense"]] == [0, 1, 2, 3]
    # No candidate at all: nothing to search, so no evaluator is needed.
    spec = get_pass("neighborhood_attention")
    ctx = PassContext(model=model, stats=hand_stats(graph, 0.6), budget=Budget(min_psnr_db=30.0))
    broad = spec.apply(graph, spec.config(tile=2), ctx)
    assert not broad.modified and broad.graph is graph and "nothing to search" in broad.report["skipped"]
    # Explicit blocks keep today's rule under a budget (no search: this context has no evaluator) ...
    ctx = PassContext(model=model, stats=stats, budget=Budget(min_psnr_db=30.0))
    given = spec.apply(graph, spec.config(tile=2, radius=1, max_cost=None, blocks=(0, 1, 2, 3)), ctx)
    assert given.report["substituted"] == [0, 1, 3] and given.replay is None and given.report["chosen_by"] == "blocks as given"
    # ... and left to the search on that output, no candidate is left: nothing to search.
    again = spec.apply(given.graph, spec.config(tile=2, radius=1, max_cost=None), ctx)
    assert not again.modified and "blocks [0, 1, 3] are already substituted" in again.report["skipped"]
    # Left to the search but nothing to search with: a clear error, not a silent mass-only choice.
    with pytest.raises(CalibrationError, match="neighborhood_attention without blocks searches"):
        spec.apply(graph, spec.config(tile=2, radius=1, max_cost=None), ctx)
