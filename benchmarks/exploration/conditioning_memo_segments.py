"""What the conditioning memo saves per segment call: the captured graph with and without the
`conditioning_memo` pass (named `timestep_memo`, timestep-only, when the 2026-11-24 log was
taken), each segment timed on its own over the model's 50 (or 28) sampling
timesteps, 6 rounds after a warm round that fills the memo, alternating the two graphs; median
per segment. Also checks both give bitwise-equal segment outputs.

    python benchmarks/exploration/conditioning_memo_segments.py dit-digits

Output: benchmarks/results/exploration/conditioning_memo_segments_MODEL.log (stdout, as run;
timestep_memo_segments_dit-digits.log is the timestep-only pass's).
"""
import statistics
import sys
import time

import torch
import torch.utils._pytree as pytree

import ditopt
from ditopt.capture import normalize_call
from explore_setup import setup

name = sys.argv[1] if len(sys.argv) > 1 else "dit-digits"
bundle, model, _, _ = setup(name)
inputs = bundle.make_inputs(4)
graphs = {
    "captured": ditopt.optimize(model, "identity", example_inputs=inputs).programs[0],
    "memo": ditopt.optimize(model, {"name": "m", "passes": [{"name": "conditioning_memo"}]}, example_inputs=inputs).programs[0],
}
scheduler = bundle.make_scheduler()
scheduler.set_timesteps(bundle.default_steps)


def env_at(graph, t):
    call = normalize_call(model, (), {**inputs, "timestep": torch.full_like(inputs["timestep"], float(t))})
    return graph.bind(pytree.tree_flatten(((), call))[0])


times: dict[str, dict[str, list[float]]] = {k: {} for k in graphs}
with torch.inference_mode():
    envs = {k: [env_at(g, t) for t in scheduler.timesteps] for k, g in graphs.items()}
    for k, g in graphs.items():
        for env in envs[k]:
            g.run_segments(env)  # warm round: fills the memo
    same = all(torch.equal(a[o], b[o]) for a, b in zip(envs["captured"], envs["memo"])
               for o in graphs["captured"].epilogue.outputs)
    for _ in range(6):
        for k, g in graphs.items():
            for env in envs[k]:
                for seg in g.main_segments:
                    t0 = time.perf_counter()
                    seg.run(env)
                    times[k].setdefault(seg.name, []).append(time.perf_counter() - t0)
print(f"{name}: {len(scheduler.timesteps)} timesteps x 6 rounds, batch {inputs['timestep'].shape[0]} (CFG), "
      f"{torch.get_num_threads()} threads; model outputs bitwise equal: {same}")
total = {k: 0.0 for k in graphs}
for seg in graphs["captured"].main_segments:
    a, b = (statistics.median(times[k][seg.name]) * 1e3 for k in graphs)
    total["captured"] += a
    total["memo"] += b
    print(f"{seg.name:10s} captured {a:7.3f} ms  memo {b:7.3f} ms  saved {a - b:6.3f} ms")
print(f"one full step: captured {total['captured']:.2f} ms, memo {total['memo']:.2f} ms")
