#!/usr/bin/env python
"""The `quantize` pass (issue 31): quality per format on a zoo model, and the W8A8 speed path.

quality: each format applied as written (and the budget-searched plan), sampled on unseen
         (class, seed) pairs none of calibration or validation used, PSNR against the float
         model; packed weight bytes; wall-clock per generation, methods interleaved.
speed:   a DiT-XL-wide stack (diffusers DiTTransformer2DModel, hidden 1152 = 16 heads x 72,
         FFN 4608, 256 tokens, batch 2, random weights, `--blocks` blocks): one denoiser call,
         float vs W8A8 through the int8 GEMM, interleaved, median of `--repeats`.

    python benchmarks/bench_quantize.py quality --model dit-digits --out benchmarks/results/quantize_dit.json
    python benchmarks/bench_quantize.py speed --blocks 4 --out benchmarks/results/quantize_speed.json
    python benchmarks/bench_quantize.py peers --model dit-digits --out benchmarks/results/quantize_peers.json

peers: torchao and optimum-quanto (the `peers` extra) at equal bits on the same layers (the blocks'
linears, embedders and adaLN modulation kept) and the same unseen pairs as `quality`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

UNSEEN_SEED0 = 470_000

FORMATS = [
    ("W8A8", {"weights": "int8", "activations": "int8", "rotation": "none"}),
    ("W8A8 hadamard", {"weights": "int8", "activations": "int8", "rotation": "hadamard"}),
    ("W4A8 int4", {"weights": "int4", "activations": "int8", "rotation": "none"}),
    ("W4A8 int4 + ARS", {"weights": "int4", "activations": "int8", "rotation": "ars"}),
    ("W4A8 TLQ", {"weights": "tlq4", "activations": "int8", "rotation": "none"}),
    ("W4A8 TLQ + ARS", {"weights": "tlq4", "activations": "int8", "rotation": "ars"}),
    ("W3A8 TLQ + ARS", {"weights": "tlq3", "activations": "int8", "rotation": "ars"}),
    ("W4A4 int4", {"weights": "int4", "activations": "int4", "rotation": "none"}),
    ("W4A4 int4 + ARS", {"weights": "int4", "activations": "int4", "rotation": "ars"}),
    ("W4A4 TLQ + ARS", {"weights": "tlq4", "activations": "int4", "rotation": "ars"}),
    ("W8A4 + ARS", {"weights": "int8", "activations": "int4", "rotation": "ars"}),
    ("W8A4", {"weights": "int8", "activations": "int4", "rotation": "none"}),
]


def quality(args) -> dict:
    import torch

    import ditopt
    from ditopt import zoo
    from ditopt.verify import psnr_lower_bound, psnr_samples

    bundle = zoo.load(args.model)
    classes = [(7 * i + 4) % bundle.num_classes for i in range(args.unseen)]
    seeds = [UNSEEN_SEED0 + i for i in range(args.unseen)]
    reference = bundle.sample(classes, seeds)
    from ditopt.calibration import calibrate
    from ditopt.capture import capture

    kwargs = bundle.make_inputs(2)
    stats = calibrate(bundle.model, capture(bundle.model, kwargs), ["block_inputs"], bundle.calibration_fn())
    methods = {"float": bundle.model}
    rows = []
    for name, cfg in FORMATS + [(f"searched {args.budget:g} dB", {})]:
        searched = not cfg
        profile = {"name": "q", "budget": {"min_psnr_db": args.budget} if searched else {"max_rel_err": 1.0},
                   "passes": [{"name": "quantize", "group_size": args.group_size, **cfg}]}
        start = time.perf_counter()
        opt = ditopt.optimize(bundle.model, ditopt.load_profile(profile), example_inputs=kwargs,
                              calibration=bundle.calibration_fn() if searched else None, stats=None if searched else stats,
                              validation=bundle.validation_fn() if searched else None, on_gate_miss="return")
        seconds = time.perf_counter() - start
        rep = next(r for r in opt.report.passes if r.name == "quantize").report
        values = psnr_samples(bundle.sample(classes, seeds, model=opt), reference)
        check = next((v for v in opt.report.verification if v["kind"] == "end-to-end"), {})
        formats = rep.get("formats", {})
        row = {"method": name, "config": cfg or {"budget": args.budget}, "unseen_mean_db": sum(values) / len(values),
               "unseen_lower90_db": psnr_lower_bound(values, 0.9), "unseen_min_db": min(values),
               "weight_compression": rep.get("weight_compression"), "weight_bits_mean": rep.get("weight_bits_mean"),
               "replayed_rel_sq_err": (rep.get("replayed_error") or {}).get("rel_sq_err"), "optimize_s": round(seconds, 1),
               "execution": rep.get("execution"), "skipped": rep.get("skipped")}
        if searched:
            row.update({"predicted_psnr_db": rep.get("predicted_psnr_db"), "target_psnr_db": rep.get("target_psnr_db"),
                        "held_out_mean_db": check.get("psnr_db"), "held_out_lower_db": check.get("psnr_lower_db"),
                        "passed": opt.report.passed, "formats_count": {f: list(formats.values()).count(f) for f in set(formats.values())}})
        if "rotation" in cfg and cfg["rotation"] == "ars":
            row["ars_outlier_layers"] = sum(f.endswith("/outlier") for f in formats.values())
            row["layers"] = len(formats)
        rows.append(row)
        methods[name] = opt
        print(json.dumps(row, default=str), flush=True)
    times = {k: [] for k in ("float", "W8A8", "W4A8 TLQ + ARS")}
    for _ in range(args.repeats):
        for k in times:
            start = time.perf_counter()
            bundle.sample(classes[: args.batch], seeds[: args.batch], model=methods[k])
            times[k].append(time.perf_counter() - start)
    timing = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"seconds_per_generation": timing}), flush=True)
    torch.set_num_threads(args.threads)
    return {"model": args.model, "unseen": {"samples": args.unseen, "seeds": [seeds[0], seeds[-1]]},
            "group_size": args.group_size, "rows": rows, "timing": {"batch": args.batch, "median_s": timing, "all_s": times}}


def speed(args) -> dict:
    import torch
    from diffusers import DiTTransformer2DModel

    import ditopt

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=args.blocks, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
                                  norm_num_groups=1).eval()
    g = torch.Generator().manual_seed(1)
    kw = {"hidden_states": torch.randn(2, 4, 32, 32, generator=g), "timestep": torch.tensor([500, 500]),
          "class_labels": torch.tensor([1, 2])}
    base = ditopt.optimize(model, "identity", example_inputs=kw)
    variants = {"float": base}
    for name, cfg in (("W8A8 int8 GEMM", {"weights": "int8", "activations": "int8", "rotation": "none"}),
                      ("W8A8 Q/DQ", {"weights": "int8", "activations": "int8", "rotation": "none", "integer_w8a8": False})):
        prof = {"name": "q", "budget": {"max_rel_err": 1.0}, "passes": [{"name": "quantize", **cfg}]}
        variants[name] = ditopt.optimize(model, prof, example_inputs=kw)
    reports = {k: next((r.report for r in v.report.passes if r.name == "quantize"), {}) for k, v in variants.items()}
    times = {k: [] for k in variants}
    with torch.no_grad():
        for v in variants.values():
            v(**kw)
        for _ in range(args.repeats):
            for k, v in variants.items():
                start = time.perf_counter()
                v(**kw)
                times[k].append(time.perf_counter() - start)
        out = {k: v(**kw).sample for k, v in variants.items()}
    med = {k: statistics.median(t) for k, t in times.items()}
    rows = [{"method": k, "seconds_per_call": med[k], "speedup": med["float"] / med[k],
             "rel_err": float((out[k] - out["float"]).norm() / out["float"].norm()),
             "weight_compression": reports[k].get("weight_compression"),
             "weight_bytes_float": reports[k].get("weight_bytes_float"), "weight_bytes_packed": reports[k].get("weight_bytes_packed")}
            for k in variants]
    for r in rows:
        print(json.dumps(r), flush=True)
    return {"stack": {"hidden": 1152, "heads": 16, "ffn": 4608, "tokens": 256, "batch": 2, "blocks": args.blocks},
            "rows": rows, "all_s": times}


def _block_linear(fqn: str) -> bool:
    """The layers ditopt quantizes by default on diffusers' DiT: the blocks' linears but their
    embedders and adaLN modulation (norm1.*)."""
    return fqn.startswith("transformer_blocks.") and ".norm1." not in fqn


def peers(args) -> dict:
    """Peers at equal bits on the same layers and the same unseen pairs as `quality`."""
    import copy

    import torch

    from ditopt import zoo
    from ditopt.verify import psnr_lower_bound, psnr_samples

    bundle = zoo.load(args.model)
    classes = [(7 * i + 4) % bundle.num_classes for i in range(args.unseen)]
    seeds = [UNSEEN_SEED0 + i for i in range(args.unseen)]
    reference = bundle.sample(classes, seeds)
    rows = []

    def torchao(config):
        from torchao.quantization import quantize_

        m = copy.deepcopy(bundle.model)
        quantize_(m, config, filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and _block_linear(fqn))
        return m

    def quanto(weights, activations):
        from optimum.quanto import Calibration, freeze, quantize

        m = copy.deepcopy(bundle.model)
        quantize(m, weights=weights, activations=activations, include=["transformer_blocks.*"], exclude=["*norm1*"])
        if activations is not None:
            with Calibration():
                bundle.calibration_fn()(m)
        freeze(m)
        return m

    def modelopt(config):
        import modelopt.torch.quantization as mtq

        m = copy.deepcopy(bundle.model)
        mtq.quantize(m, copy.deepcopy(config), forward_loop=lambda mm: bundle.calibration_fn()(mm))
        # The same layers as the others: quantizers outside the blocks' linears off.
        mtq.disable_quantizer(m, lambda name: not _block_linear(name))
        return m

    def build(name):
        if name.startswith("modelopt"):
            import modelopt.torch.quantization as mtq

            return modelopt({"modelopt W8A8 (INT8_SMOOTHQUANT_CFG)": mtq.INT8_SMOOTHQUANT_CFG,
                             "modelopt W8A8 (INT8_DEFAULT_CFG)": mtq.INT8_DEFAULT_CFG,
                             "modelopt W4A16 (INT4_AWQ_CFG)": mtq.INT4_AWQ_CFG,
                             "modelopt W4A8 (W4A8_AWQ_BETA_CFG)": mtq.W4A8_AWQ_BETA_CFG}[name])
        from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8DynamicActivationIntxWeightConfig,
                                          Int8WeightOnlyConfig)
        from torchao.quantization.granularity import PerGroup

        if name == "torchao W8A8 (Int8DynamicActivationInt8Weight)":
            return torchao(Int8DynamicActivationInt8WeightConfig())
        if name == "torchao W8A16 (Int8WeightOnly)":
            return torchao(Int8WeightOnlyConfig())
        if name == "torchao W4A8 (Int8DynamicActivationIntxWeight int4, group 64)":
            return torchao(Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(64)))
        from optimum.quanto import qint4, qint8

        if name == "quanto W8A8 (qint8/qint8, calibrated)":
            return quanto(qint8, qint8)
        if name == "quanto W4A8 (qint4/qint8, calibrated)":
            return quanto(qint4, qint8)
        raise KeyError(name)

    for name in ("torchao W8A8 (Int8DynamicActivationInt8Weight)", "torchao W8A16 (Int8WeightOnly)",
                 "torchao W4A8 (Int8DynamicActivationIntxWeight int4, group 64)",
                 "quanto W8A8 (qint8/qint8, calibrated)", "quanto W4A8 (qint4/qint8, calibrated)",
                 "modelopt W8A8 (INT8_DEFAULT_CFG)", "modelopt W8A8 (INT8_SMOOTHQUANT_CFG)",
                 "modelopt W4A16 (INT4_AWQ_CFG)", "modelopt W4A8 (W4A8_AWQ_BETA_CFG)"):
        try:
            model = build(name)
            with torch.no_grad():
                values = psnr_samples(bundle.sample(classes, seeds, model=model), reference)
            row = {"method": name, "unseen_mean_db": sum(values) / len(values),
                   "unseen_lower90_db": psnr_lower_bound(values, 0.9), "unseen_min_db": min(values)}
        except Exception as exc:  # a peer that does not run here is a row saying why
            row = {"method": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torchao", "optimum-quanto", "nvidia-modelopt")}
    return {"model": args.model, "unseen": {"samples": args.unseen, "seeds": [seeds[0], seeds[-1]]}, "rows": rows,
            "versions": versions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["quality", "speed", "peers"])
    p.add_argument("--model", default="dit-digits")
    p.add_argument("--budget", type=float, default=30.0)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--unseen", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from ditopt.bench.measure import script_run_record
    from ditopt.io import atomic_write_text

    torch.set_num_threads(args.threads)
    result = {"quality": quality, "speed": speed, "peers": peers}[args.what](args)
    result["run"] = script_run_record("benchmarks/bench_quantize.py", argv, args.threads)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
