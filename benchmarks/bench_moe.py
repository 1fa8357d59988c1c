#!/usr/bin/env python
"""The `moe_split` pass (issue 32): quality under the budget on a zoo model, MoE against width
pruning at equal activated neurons, and the routed FFN's realized speed.

quality:  the budget-searched split (training-free, and with distillation) and fixed top_k
          splits, sampled on unseen (class, seed) pairs none of calibration or validation used,
          PSNR against the dense model; activated FFN parameters; wall-clock per generation of
          the dense model, the searched plans, `balanced` caching alone and the searched split
          composed with it, interleaved.
layerwise: per FFN, on calibration tokens the split did not fit on: the FFN output's PSNR for
          the MoE split at each top_k against width pruning keeping the same number of neurons
          (the most contributing ones; the dropped ones count as their mean, as skipped experts do).
speed:    one FFN of a DiT-XL-wide stack (hidden 1152, FFN 4608, 256 tokens, batch 2): dense
          (two linears and GELU) against ditopt::moe_ffn at 8 experts, top 4 (half active) and
          top 2, interleaved, median of `--repeats`.

    python benchmarks/bench_moe.py quality --model dit-digits --out benchmarks/results/moe_dit.json
    python benchmarks/bench_moe.py layerwise --model dit-digits --out benchmarks/results/moe_layerwise.json
    python benchmarks/bench_moe.py speed --out benchmarks/results/moe_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

UNSEEN_SEED0 = 520_000


def _record(opt):
    return next((r for r in opt.report.passes if r.name == "moe_split"), None)


def quality(args) -> dict:
    import ditopt
    from ditopt import zoo
    from ditopt.verify import psnr_lower_bound, psnr_samples

    bundle = zoo.load(args.model)
    classes = [(3 * i + 5) % bundle.num_classes for i in range(args.unseen)]
    seeds = [UNSEEN_SEED0 + i for i in range(args.unseen)]
    reference = bundle.sample(classes, seeds)
    kwargs = bundle.make_inputs(2)
    budget = {"min_psnr_db": args.budget}
    distill = {"distill_steps": args.distill_steps, "tokens_per_row": 128}
    variants = [
        ("searched, training-free", {"budget": budget, "passes": [{"name": "moe_split"}]}),
        (f"searched, distilled ({args.distill_steps} steps)", {"budget": budget, "passes": [{"name": "moe_split", **distill}]}),
        ("top_k 3 of 7 + shared, training-free", {"budget": {"max_rel_err": 10.0}, "passes": [{"name": "moe_split", "top_k": 3}]}),
        (f"top_k 3 of 7 + shared, distilled ({args.distill_steps} steps)",
         {"budget": {"max_rel_err": 10.0}, "passes": [{"name": "moe_split", "top_k": 3, **distill}]}),
        ("balanced (caching)", "balanced"),
    ]
    methods = {"dense": bundle.model}
    rows = []
    for name, spec in variants:
        if isinstance(spec, str):
            profile = ditopt.load_profile(spec)
        else:
            profile = ditopt.load_profile({"name": "moe", **spec})
        start = time.perf_counter()
        opt = ditopt.optimize(bundle.model, profile, example_inputs=kwargs, calibration=bundle.calibration_fn(),
                              validation=bundle.validation_fn(), on_gate_miss="return")
        seconds = time.perf_counter() - start
        methods[name] = opt
        rows.append(_row(name, opt, seconds, bundle, classes, seeds, reference, psnr_samples, psnr_lower_bound))
        print(json.dumps(rows[-1], default=str), flush=True)
    # The searched (distilled) split composed with caching: its resolved choice, then `balanced`.
    best = next(r for r in rows if r["method"].startswith("searched, distilled"))
    if best.get("resolved_layers"):
        cache = ditopt.load_profile("balanced")
        composed = {"name": "moe+balanced", "budget": {"min_psnr_db": args.budget},
                    "passes": [{"name": "moe_split", "layers": best["resolved_layers"], **distill}]
                    + _passes(cache)}
        start = time.perf_counter()
        opt = ditopt.optimize(bundle.model, ditopt.load_profile(composed), example_inputs=kwargs,
                              calibration=bundle.calibration_fn(), validation=bundle.validation_fn(), on_gate_miss="return")
        name = "searched distilled split + balanced"
        methods[name] = opt
        rows.append(_row(name, opt, time.perf_counter() - start, bundle, classes, seeds, reference, psnr_samples,
                         psnr_lower_bound))
        print(json.dumps(rows[-1], default=str), flush=True)
    times = {k: [] for k in methods}
    for _ in range(args.repeats):
        for k, m in methods.items():
            start = time.perf_counter()
            bundle.sample(classes[: args.batch], seeds[: args.batch], model=m)
            times[k].append(time.perf_counter() - start)
    timing = {k: statistics.median(v) for k, v in times.items()}
    for r in rows:
        r["seconds_per_generation"] = timing[r["method"]]
        r["speedup"] = timing["dense"] / timing[r["method"]]
    print(json.dumps({"seconds_per_generation": timing}), flush=True)
    return {"model": args.model, "budget_db": args.budget, "unseen": {"samples": args.unseen, "seeds": [seeds[0], seeds[-1]]},
            "rows": rows, "timing": {"batch": args.batch, "median_s": timing, "all_s": times}}


def _passes(profile):
    """A loaded profile's pass entries as plain dicts ({"name": ..., **config})."""
    out = []
    for p in profile.passes:
        out.append({"name": p.name, **p.config.model_dump(exclude_defaults=True)})
    return out


def _row(name, opt, seconds, bundle, classes, seeds, reference, psnr_samples, psnr_lower_bound) -> dict:
    values = psnr_samples(bundle.sample(classes, seeds, model=opt), reference)
    rec = _record(opt)
    rep = rec.report if rec is not None else {}
    check = next((v for v in opt.report.verification if v["kind"] == "end-to-end"), {})
    active = rep.get("activated_ffn_parameters") or {}
    return {"method": name, "unseen_mean_db": sum(values) / len(values), "unseen_lower90_db": psnr_lower_bound(values, 0.9),
            "unseen_min_db": min(values), "activated_ffn_fewer": active.get("fewer", 0.0 if rec else None),
            "top_k": {n: v["top_k"] for n, v in (rep.get("layers") or {}).items()},
            "resolved_layers": {n: v["top_k"] for n, v in (rep.get("layers") or {}).items()},
            "predicted_psnr_db": rep.get("predicted_psnr_db"), "target_psnr_db": rep.get("target_psnr_db"),
            "held_out_mean_db": check.get("psnr_db"), "held_out_lower_db": check.get("psnr_lower_db"),
            "passed": opt.report.passed, "optimize_s": round(seconds, 1), "skipped": rep.get("skipped"),
            "load_max_over_mean": {n: v["load_max_over_mean"] for n, v in (rep.get("layers") or {}).items()},
            "replayed_rel_sq_err": (rep.get("replayed_error") or {}).get("rel_sq_err")}


def layerwise(args) -> dict:
    import torch

    from ditopt import zoo
    from ditopt.calibration import calibrate
    from ditopt.calibration.replay import CalibrationReplay
    from ditopt.capture import capture
    from ditopt.graph import attribute
    from ditopt.kernels.moe import activate, expert_mask, masked_ffn
    from ditopt.passes.moe.moe_split import _by_segment
    from ditopt.passes.moe.rewrite import find_ffns
    from ditopt.passes.moe.split import distill_experts, skip_offsets, split_ffn

    bundle = zoo.load(args.model)
    graph = capture(bundle.model, bundle.make_inputs(2))
    stats = calibrate(bundle.model, graph, ["block_inputs"], bundle.calibration_fn(), progress=False)
    replay = CalibrationReplay(graph, stats, 64)
    ffns, _ = find_ffns(graph)
    inputs = replay.node_inputs(_by_segment(ffns), per_row=128)
    db = lambda e: float(-10 * torch.log10(torch.tensor(max(e, 1e-30))))  # noqa: E731
    rows = []
    for ffn in ffns:
        mod = graph.segment(ffn.segment).module
        w1, b1, w2, b2 = (attribute(mod, t).detach().float() if t else None for t in (ffn.w1, ffn.b1, ffn.w2, ffn.b2))
        x = inputs[ffn.name]
        cut = x.shape[0] * 3 // 4
        fit, test = x[:cut], x[cut:]  # the split fits on the first rows' tokens, is judged on the others
        dense = lambda z: activate(z @ w1.T + b1, ffn.activation) @ w2.T  # noqa: E731  (b2 left out: both keep it)
        want = dense(test)
        rel = lambda got: float((got - want).pow(2).sum() / want.pow(2).sum())  # noqa: E731
        experts, shared_groups = 7, 1
        h = ffn.hidden // (experts + shared_groups)
        base = split_ffn(fit, w1, b1, w2, None, ffn.activation, experts, shared_groups * h, "coactivation", 1e-3)
        # Width pruning's order: the same contribution ranking the shared expert is chosen by.
        a_fit = activate(fit @ w1.T + b1, ffn.activation)
        order = torch.argsort((a_fit.abs() * w2.norm(dim=0)).mean(0), descending=True)
        for k in range(1, experts):
            neurons = shared_groups * h + k * h
            w = skip_offsets(fit, base, ffn.activation, k)
            chosen = expert_mask(test, w.router_w, w.router_b, experts, k)
            moe = masked_ffn(test, w.w1, w.b1, w.w2t, w.b2, w.offsets, chosen, w.shared, ffn.activation)
            keep, drop = order[:neurons], order[neurons:]
            mean_drop = a_fit[:, drop].mean(0) @ w2[:, drop].T
            a_test = activate(test @ w1.T + b1, ffn.activation)
            width = a_test[:, keep] @ w2[:, keep].T + mean_drop
            row = {"ffn": ffn.name, "top_k": k, "active_neurons": neurons, "hidden": ffn.hidden,
                   "moe_db": db(rel(moe)), "width_prune_db": db(rel(width))}
            if args.distill_steps and k in (2, 3, 4):
                y_fit = dense(fit)
                wd, _ = distill_experts(fit, y_fit, w, ffn.activation, k, args.distill_steps)
                got = masked_ffn(test, wd.w1, wd.b1, wd.w2t, wd.b2, wd.offsets,
                                 expert_mask(test, wd.router_w, wd.router_b, experts, k), wd.shared, ffn.activation)
                row["moe_distilled_db"] = db(rel(got))
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for k in range(1, 7):
        sel = [r for r in rows if r["top_k"] == k]
        summary[str(k)] = {"active_fraction": sel[0]["active_neurons"] / sel[0]["hidden"],
                           "moe_minus_width_db_mean": statistics.mean(r["moe_db"] - r["width_prune_db"] for r in sel),
                           "moe_db_mean": statistics.mean(r["moe_db"] for r in sel),
                           "width_prune_db_mean": statistics.mean(r["width_prune_db"] for r in sel)}
        if "moe_distilled_db" in sel[0]:
            summary[str(k)]["moe_distilled_db_mean"] = statistics.mean(r["moe_distilled_db"] for r in sel)
    return {"model": args.model, "split": {"experts": 7, "shared_experts": 1}, "rows": rows, "summary": summary,
            "tokens": {"fit": int(cut), "judged": int(x.shape[0] - cut)}}


def speed(args) -> dict:
    import torch
    import torch.nn.functional as F

    import ditopt.kernels.moe  # noqa: F401  (registers the op)

    d, hidden, tokens = 1152, 4608, 2 * 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, d, generator=g)
    w1, b1 = torch.randn(hidden, d, generator=g) * 0.02, torch.zeros(hidden)
    w2, b2 = torch.randn(d, hidden, generator=g) * 0.02, torch.zeros(d)
    w2t = w2.T.contiguous()
    variants = {"dense": lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)}
    for experts, k, shared in ((8, 4, 0), (8, 2, 0), (7, 3, 1)):
        rw, rb = torch.randn(experts, d, generator=g), torch.zeros(experts)
        off = torch.zeros(experts, d)
        variants[f"moe {k} of {experts}" + (f" + {shared} shared" if shared else "")] = (
            lambda rw=rw, rb=rb, off=off, e=experts, k=k, s=shared: torch.ops.ditopt.moe_ffn(
                x, w1, b1, w2t, b2, off, rw, rb, s * hidden // (e + s), e, k, "gelu_tanh"))
    times = {k: [] for k in variants}
    with torch.inference_mode():
        for f in variants.values():
            f()
        for _ in range(args.repeats):
            for k, f in variants.items():
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in variants:
        active = 1.0 if k == "dense" else _active_fraction(k)
        rows.append({"method": k, "active_fraction": active, "seconds_per_call": med[k], "speedup": med["dense"] / med[k]})
        print(json.dumps(rows[-1]), flush=True)
    return {"ffn": {"hidden": d, "ffn": hidden, "tokens": tokens, "batch": 2}, "rows": rows, "all_s": times}


def _active_fraction(label: str) -> float:
    parts = label.split()
    k, experts = int(parts[1]), int(parts[3])
    shared = int(parts[5]) if len(parts) > 5 else 0
    return (k + shared) / (experts + shared)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["quality", "layerwise", "speed"])
    p.add_argument("--model", default="dit-digits")
    p.add_argument("--budget", type=float, default=30.0)
    p.add_argument("--distill-steps", type=int, default=400)
    p.add_argument("--unseen", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from ditopt.bench.measure import script_run_record
    from ditopt.io import atomic_write_text

    torch.set_num_threads(args.threads)
    result = {"quality": quality, "layerwise": layerwise, "speed": speed}[args.what](args)
    result["run"] = script_run_record("benchmarks/bench_moe.py", argv, args.threads)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
