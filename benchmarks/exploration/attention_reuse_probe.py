"""Exploration: FasterCache-style attention reuse inside ditopt's calibrated schedule. On
some computed steps each block's attention output (pre-gate, role attn*.out) is forecast
(Taylor order 0/1 from the last steps that computed attention) and the FFN computed; skipped
steps forecast the whole stack's residual as before. Mean per-sample PSNR on 4 calibration
and 16 held-out seeds, and MACs of the calibration run relative to the unoptimized model.

    python benchmarks/exploration/attention_reuse_probe.py dit-digits 35
    python benchmarks/exploration/attention_reuse_probe.py flux-digits 9
    python benchmarks/exploration/attention_reuse_probe.py flux-digits 9,10,11 late

Output: benchmarks/results/exploration/attention_reuse_probe_<model>[_late].log (stdout, as run).
"""
import sys
from dataclasses import dataclass, replace

import ditopt
from ditopt.plan import RunSegments
from ditopt.registry import PassConfig, PassResult, register_pass
from ditopt.passes.caching.collector import residual_meta
from ditopt.passes.caching.features import FORECAST_SUFFIX, forecast_variant, record_variant
from ditopt.passes.caching.common import block_names as _block_names, replace_blocks
from ditopt.passes.caching.schedule import fit_forecast_weights, quantile_schedule, sketch_channels, span_residual_sketch
from ditopt.passes.caching.stage import CachedSpan, StaticSchedule, TaylorCache
from explore_setup import calibrated, macs_of, print_row, setup


def attention_nodes(segment):
    out = []
    for node in segment.module.graph.nodes:
        role = (node.meta.get("ditopt") or {}).get("role") or ""
        if node.op == "call_function" and role.startswith("attn") and role.endswith(".out") and node.name not in out:
            out.append(node.name)
    return out


@dataclass
class AttnReuseSpan(CachedSpan):
    attn_reuse: tuple = ()
    feats: dict = None
    attn_order: int = 1

    def run(self, graph, env, ctx):
        st = ctx.state.setdefault(self.key + "_attn", {b: TaylorCache(self.attn_order) for b in self.blocks})
        reuse = ctx.step < len(self.attn_reuse) and self.attn_reuse[ctx.step] and st[self.blocks[0]].t is not None
        if not (self.policy.compute[ctx.step] if ctx.step < len(self.policy.compute) else True):
            return super().run(graph, env, ctx)
        t = ctx.timestep if ctx.timestep is not None else float(ctx.step)
        # Swap RunSegments for the variants for this call, then let CachedSpan do the rest.
        original = RunSegments.run

        def run_blocks(stage, g, e, c):
            if stage.names != self.blocks:
                return original(stage, g, e, c)
            for name in self.blocks:
                if reuse:
                    for f, v in zip(self.feats[name], st[name].predict(t)):
                        e[f + FORECAST_SUFFIX] = v
                    g.segment(f"{name}:attnforecast").run(e)
                else:
                    g.segment(f"{name}:attnrecord").run(e)
                    st[name].update([e[f] for f in self.feats[name]], t)
        RunSegments.run = run_blocks
        try:
            super().run(graph, env, ctx)
        finally:
            RunSegments.run = original


class ProtoConfig(PassConfig):
    compute_steps: tuple[int, ...]
    attn_reuse_steps: tuple[int, ...] = ()
    attn_order: int = 1


@register_pass("proto_attn_reuse", ProtoConfig, needs=("trajectory",), level="plan")
def proto(graph, config, ctx):
    stats = ctx.stats
    names = tuple(_block_names(graph))
    steps, times = stats.num_steps, tuple(stats.timesteps)
    mask = [s in set(config.compute_steps) for s in range(steps)]
    residual = span_residual_sketch(stats, 0, len(names) - 1)
    ch = sketch_channels(stats)
    weights = fit_forecast_weights(residual, mask, list(times), 3, ch, int(residual_meta(stats)["stream_shape"][-1]))
    feats = {}
    for n in names:
        seg = graph.segment(n)
        feats[n] = attention_nodes(seg)
        v = forecast_variant(seg, feats[n])
        v = replace(v, name=f"{n}:attnforecast")
        r = record_variant(seg, feats[n])
        r = replace(r, name=f"{n}:attnrecord")
        graph = graph.with_variant(v).with_variant(r)
    reuse = tuple(s in set(config.attn_reuse_steps) for s in range(steps))
    stage = AttnReuseSpan(names, StaticSchedule(tuple(mask), times, "rederive", weights), 1, key="proto",
                          attn_reuse=reuse, feats=feats, attn_order=config.attn_order)
    return PassResult(replace_blocks(graph, [stage]), True, {})


if __name__ == "__main__":
    name = sys.argv[1]; ks = [int(x) for x in sys.argv[2].split(',')]
    b, m, calA, val = setup(name)
    refA = calA(m); refV = val(m)
    base = macs_of(calA, m)
    stats, changes = calibrated(b, m, calA)

    def run(label, mask, reuse, order=1):
        cs = tuple(i for i, c in enumerate(mask) if c)
        p = {"name": "proto_attn_reuse", "compute_steps": cs, "attn_reuse_steps": tuple(reuse), "attn_order": order}
        o = ditopt.optimize(m, {"name": "x", "passes": [p]}, example_inputs=b.make_inputs(2), stats=stats, calibration=calA)
        print_row(label, o, base, calA, refA, val, refV)

    late_sweep = sys.argv[3:] == ["late"]
    for k in ks:
        mask = quantile_schedule(changes, k, 2, 0.0)
        computed = [i for i, c in enumerate(mask) if c and i >= 2]
        if late_sweep:  # attention reused on the last j computed steps only
            for j in (1, 2, 3, 4):
                for order in (0, 1):
                    late = computed[::-1]
                    run(f"k={k} last {j} every other o{order}", mask, late[0::2][:j], order)
                    run(f"k={k} last {j} consecutive o{order}", mask, late[:j], order)
            continue
        run(f"k={k} no reuse", mask, ())
        for order in (0, 1):
            run(f"k={k} reuse every 2nd o{order}", mask, computed[1::2], order)
            run(f"k={k} reuse 2 of 3 o{order}", mask, [c for j, c in enumerate(computed) if j % 3], order)
        run(f"k={k} reuse late half every 2nd o1", mask, [c for c in computed[1::2] if c >= len(mask) // 2], 1)
