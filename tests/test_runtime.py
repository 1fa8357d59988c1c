"""The drop-in runtime: identity parity, per-shape capture, step and CFG-branch state."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, make_inputs
from torch import nn
import torch.nn.functional as F

import ditopt
from ditopt.plan import RunSegments, Stage
from ditopt.registry import PassConfig, PassResult, register_pass
from ditopt.verify import relative_error, tensor_leaves


def _out(value):
    return tensor_leaves(value)[0]


@pytest.mark.parametrize("batch,resolution", [(1, None), (2, None), (1, 16)])
def test_identity_parity(arch, batch, resolution):
    model = build_model(arch)
    example = make_inputs(arch, model) if arch == "plain" else None
    optimized = ditopt.optimize(model, "identity", example_inputs=example)
    assert optimized.report.passed
    kwargs = make_inputs(arch, model, batch=batch, resolution=resolution, seed=7)
    with torch.no_grad():
        ref = model(**kwargs)
        out = optimized(**kwargs)
    assert type(out) is type(ref)
    assert relative_error(_out(out), _out(ref)) < 1e-6


def test_positional_call_and_return_dict_false():
    model = build_model("dit")
    optimized = ditopt.optimize(model, "identity")
    kw = make_inputs("dit", model, batch=2)
    with torch.no_grad():
        ref = model(kw["hidden_states"], kw["timestep"], kw["class_labels"], return_dict=False)
        out = optimized(kw["hidden_states"], kw["timestep"], kw["class_labels"], return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], ref[0])


def test_model_not_mutated_and_params_shared():
    model = build_model("sd3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(p) for k, p in model.named_parameters()}
    optimized = ditopt.optimize(model, "identity")
    with torch.no_grad():
        optimized(**make_inputs("sd3", model, batch=2))
    assert {k: id(p) for k, p in model.named_parameters()} == ids
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # No parameter copy up front: the segments' tensors share the original's storage, as
    # objects of their own (tests/test_isolation.py: what happens when they are handed out).
    own = list(optimized.segment_modules.parameters())
    assert {p.data_ptr() for p in own} <= {p.data_ptr() for p in model.parameters()}
    assert not {id(p) for p in own} & set(ids.values())
    assert optimized.config is model.config


def test_new_shape_is_captured_again():
    model = build_model("dit")
    optimized = ditopt.optimize(model, "identity")
    with torch.no_grad():
        optimized(**make_inputs("dit", model, batch=1))
        optimized(**make_inputs("dit", model, batch=3))
        optimized(**make_inputs("dit", model, batch=1))
    assert len(optimized.programs) == 2


# -- step and CFG-branch state on a model whose outputs are computable by hand ----------------
class DoublingBlock(nn.Module):
    """Returns 2x: the attention term is multiplied by zero but keeps the block a DiT block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None])[:, 0]
        return 2 * x + 0 * attn


class DoublingDiT(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.blocks = nn.ModuleList([DoublingBlock() for _ in range(depth)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = x * self.scale
        for block in self.blocks:
            h = block(h)
        return h


class ReuseFromFirstStep(Stage):
    """Test stage: computes the blocks on step 0 and, later, adds the step-0 residual."""

    kind = "test-reuse"

    def __init__(self, names, in_name, out_name):
        self.names, self.in_name, self.out_name = tuple(names), in_name, out_name

    def segment_names(self):
        return self.names

    def run(self, graph, env, ctx):
        x = env[self.in_name]
        if "residual" in ctx.state:
            env[self.out_name] = x + ctx.state["residual"]
            return
        RunSegments(self.names).run(graph, env, ctx)
        ctx.state["residual"] = env[self.out_name] - x


class ReuseConfig(PassConfig):
    pass


@register_pass("test_reuse_blocks", ReuseConfig, level="plan")
def _reuse(graph, config, ctx):
    blocks = graph.block_segments
    stage = ReuseFromFirstStep([s.name for s in blocks], blocks[0].inputs[0], blocks[-1].outputs[0])
    plan = (graph.plan[0], stage, graph.plan[-1])
    return PassResult(graph.evolve(plan=plan), True, {"stage": "reuse"})


def _reuse_model():
    model = DoublingDiT(depth=3).eval()
    example = {"x": torch.ones(1, 4, 8), "timestep": torch.tensor([10.0])}
    profile = {"name": "t", "passes": [{"name": "test_reuse_blocks"}], "budget": {"max_rel_err": 1e-6}}
    return model, ditopt.optimize(model, profile, example_inputs=example)


def test_cfg_branches_split_calls_have_separate_state():
    _, opt = _reuse_model()
    a, b, c, d = (torch.full((1, 4, 8), v) for v in (1.0, 10.0, 3.0, 5.0))
    t0, t1 = torch.tensor([10.0]), torch.tensor([9.0])
    with torch.no_grad():
        assert torch.allclose(opt(x=a, timestep=t0), 8 * a)  # step 0, branch 0: computed
        assert torch.allclose(opt(x=b, timestep=t0), 8 * b)  # step 0, branch 1: computed
        # Step 1 reuses each branch's own step-0 residual (7a and 7b), computable by hand.
        assert torch.allclose(opt(x=c, timestep=t1), c + 7 * a)
        assert opt.tracker.step == 1 and opt.tracker.branch == 0
        assert torch.allclose(opt(x=d, timestep=t1), d + 7 * b)
        assert opt.tracker.branch == 1


def test_cfg_batched_rows_keep_their_own_values():
    _, opt = _reuse_model()
    first = torch.cat([torch.full((1, 4, 8), 1.0), torch.full((1, 4, 8), 10.0)])
    later = torch.cat([torch.full((1, 4, 8), 3.0), torch.full((1, 4, 8), 5.0)])
    with torch.no_grad():
        opt(x=first, timestep=torch.tensor([10.0, 10.0]))
        out = opt(x=later, timestep=torch.tensor([9.0, 9.0]))
    assert torch.allclose(out, later + 7 * first)


def test_new_generation_detected_and_reset():
    _, opt = _reuse_model()
    a, c = torch.full((1, 4, 8), 1.0), torch.full((1, 4, 8), 3.0)
    with torch.no_grad():
        opt(x=a, timestep=torch.tensor([10.0]))
        opt(x=a, timestep=torch.tensor([9.0]))
        # The timestep goes up: a new generation, so step 0 computes everything again.
        assert torch.allclose(opt(x=c, timestep=torch.tensor([10.0])), 8 * c)
        assert opt.tracker.step == 0 and opt.tracker.generation == 1
        opt.reset()
        assert torch.allclose(opt(x=c, timestep=torch.tensor([5.0])), 8 * c)
        with opt.generation():
            assert torch.allclose(opt(x=a, timestep=torch.tensor([1.0])), 8 * a)


@pytest.mark.parametrize(
    "name,config",
    [
        ("AuraFlowTransformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, out_channels=4, pos_embed_max_size=16)),
        ("SanaTransformer2DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                                        caption_channels=16, sample_size=8, patch_size=1)),
    ],
)
def test_untested_diffusers_families_work_generically(name, config):
    """Architectures with no adapter and no mention anywhere in ditopt: generic recovery only."""
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, name)(**config).eval()
    optimized = ditopt.optimize(model, "identity")
    assert len(optimized.programs[0].blocks) == 2
    assert optimized.report.passed
