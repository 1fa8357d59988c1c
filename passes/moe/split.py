"""Splitting one dense FFN into experts, from its inputs on calibration tokens (no training).

* Neuron contribution: c_i(t) = |a_i(t)| * ||W2[:, i]||, the size of neuron i's share of the
  output on token t (a first-order, gradient-free stand-in for Dense2MoE's Taylor importance
  |a_i dL/da_i|, which needs a training loss we do not have).
* Shared expert: the `shared` neurons with the largest mean contribution, active on every token.
* Routed experts: the other neurons in `experts` equal groups by balanced k-means on their
  normalised, centred contribution patterns over the calibration tokens (neurons that vary on
  the same tokens go together, so a token's departure from the mean concentrates in few
  experts), or on the normalised rows of W1 when `clustering = "weights"`.
* A skipped expert counts as its mean output over the calibration tokens that skip it at the
  FFN's top_k (`offsets`, folded into the down projection's bias) rather than as zero: zero
  where experts are truly sparse (ReLU-like, planted), the typical value where they are dense
  (GELU); on dit-digits' FFNs about 0.5 to 1 dB better than zero.
* Router: a ridge least-squares map from [x, 1] to each expert's departure from its mean,
  ||a_e W2_e^T - mean_e||, on the calibration tokens; a token runs the experts it predicts largest.
* Distillation (optional): the experts' weights and offsets trained towards the dense FFN's
  outputs on the calibration tokens under the router's fixed choice, by the core's distillation
  (ditopt.distill, as the other lossy passes); a held-out quarter of the tokens keeps the best state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ditopt.distill import distill, relative_error
from ditopt.fit import bias_features, ridge_solve
from ditopt.kernels.moe import activate, expert_mask, masked_ffn, route

from .rewrite import ExpertWeights


def _balanced_assign(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each row to a column, `capacity` rows per column, greedily by ascending cost over all
    (row, column) pairs: [n, E] -> [n] column index."""
    n, e = cost.shape
    order = torch.argsort(cost.reshape(-1), stable=True).tolist()
    assign = [-1] * n
    room = [capacity] * e
    left = n
    for flat in order:
        r, c = divmod(flat, e)
        if assign[r] < 0 and room[c]:
            assign[r] = c
            room[c] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(assign)


def balanced_kmeans(features: torch.Tensor, groups: int, iters: int = 12, seed: int = 0) -> torch.Tensor:
    """[n, f] unit rows -> [n] group index, n / groups per group (cosine distance)."""
    n = features.shape[0]
    gen = torch.Generator().manual_seed(seed)
    # Farthest-point initialisation: a random first centroid, then each next one the point least
    # similar to those chosen (two seeds in one true cluster would split it and merge two others).
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    for _ in range(groups - 1):
        closeness = (features @ features[chosen].T).max(1).values
        closeness[chosen] = float("inf")
        chosen.append(int(closeness.argmin()))
    centroids = features[chosen].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(-(features @ centroids.T), n // groups)
        if torch.equal(new, assign):
            break
        assign = new
        for g in range(groups):
            members = features[assign == g]
            centroids[g] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return assign


@dataclass
class SplitStats:
    load: list[float]  # fraction of routed slots per expert on the calibration tokens
    captured: float  # fraction of the routed experts' true output norm the router's choice keeps
    oracle_captured: float  # the same for the best possible choice (the top-k true norms)


def split_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
              activation: str, experts: int, shared: int, clustering: str, ridge: float,
              seed: int = 0) -> ExpertWeights:
    """x [n, D] calibration inputs; w1 [H, D], w2 [D, H] the dense weights."""
    w1, w2 = w1.detach().float(), w2.detach().float()
    b1 = torch.zeros(w1.shape[0]) if b1 is None else b1.detach().float()
    a = activate(x.float() @ w1.T + b1, activation)  # [n, H]
    contrib = a.abs() * w2.norm(dim=0)[None, :]
    order = torch.argsort(contrib.mean(0), descending=True, stable=True)
    shared_idx, rest = order[:shared], order[shared:].sort().values
    if clustering == "weights":
        feats = torch.nn.functional.normalize(w1[rest], dim=1)
    else:
        centred = contrib[:, rest] - contrib[:, rest].mean(0)
        feats = torch.nn.functional.normalize(centred.T, dim=1)
    groups = balanced_kmeans(feats, experts, seed=seed)
    perm = torch.cat([shared_idx.sort().values] + [rest[groups == g] for g in range(experts)])
    w1p, b1p, w2tp = w1[perm], b1[perm], w2.T[perm]
    outs = _expert_outputs(a[:, perm], w2tp, shared, experts)  # [n, E, D]
    offsets = outs.mean(0)
    router_w, router_b = fit_router(x, (outs - offsets).norm(dim=2), ridge)
    bias = (torch.zeros(w2.shape[0]) if b2 is None else b2.detach().float()) + offsets.sum(0)
    return ExpertWeights(w1p.contiguous(), b1p.contiguous(), w2tp.contiguous(), bias, offsets.contiguous(),
                         router_w, router_b, shared, experts)


def _expert_outputs(a: torch.Tensor, w2t: torch.Tensor, shared: int, experts: int) -> torch.Tensor:
    """a [n, H] activations in the split's neuron order -> each routed expert's output [n, E, D]."""
    h = (a.shape[1] - shared) // experts
    return torch.einsum("neh,ehd->ned", a[:, shared:].reshape(a.shape[0], experts, h),
                        w2t[shared:].reshape(experts, h, -1))


def fit_router(x: torch.Tensor, target: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares [x, 1] -> target in float64 (the bias undamped): ([E, D], [E])."""
    w = ridge_solve(bias_features(x), target, ridge)
    return w[:-1].T.float().contiguous(), w[-1].float().contiguous()


def skip_offsets(x: torch.Tensor, w: ExpertWeights, activation: str, top_k: int) -> ExpertWeights:
    """`w` with each expert's offset its mean output over the tokens whose top_k skips it."""
    a = activate(x.float() @ w.w1.T + w.b1, activation)
    outs = _expert_outputs(a, w.w2t, w.shared, w.experts)  # [n, E, D]
    skipped = 1.0 - expert_mask(x.float(), w.router_w, w.router_b, w.experts, top_k)  # [n, E]
    offsets = torch.einsum("ne,ned->ed", skipped, outs) / skipped.sum(0).clamp_min(1.0)[:, None]
    return dataclasses.replace(w, offsets=offsets.contiguous(), b2=(w.b2 - w.offsets.sum(0) + offsets.sum(0)).contiguous())


def split_stats(x: torch.Tensor, w: ExpertWeights, activation: str, top_k: int) -> SplitStats:
    """Load balance, and how much of the experts' departure from their means the router's
    choice keeps (beside the best choice's), on calibration tokens."""
    a = activate(x.float() @ w.w1.T + w.b1, activation)
    norms = (_expert_outputs(a, w.w2t, w.shared, w.experts) - w.offsets).norm(dim=2)
    chosen = route(x.float(), w.router_w, w.router_b, top_k)
    load = torch.bincount(chosen.reshape(-1), minlength=w.experts).float() / chosen.numel()
    total = norms.sum().clamp_min(1e-30)
    return SplitStats([round(float(v), 4) for v in load], float(norms.gather(1, chosen).sum() / total),
                      float(norms.topk(top_k, dim=1).values.sum() / total))


def distill_experts(x: torch.Tensor, y: torch.Tensor, w: ExpertWeights, activation: str, top_k: int, steps: int,
                    lr: float = 1e-3, batch: int = 1024, seed: int = 0) -> tuple[ExpertWeights, dict[str, float]]:
    """Train the experts (weights, biases, offsets) towards the dense outputs y on tokens x under
    the router's fixed choice, with the core's distillation (ditopt.distill: Adam on copies, the
    best held-out state, inside or outside inference mode). Three quarters of the tokens train, in
    shuffled batches of at most `batch` (mean squared error), one quarter judges (relative squared
    error, 20 checks). Returns the new weights and the log (held-out error before and after,
    steps, batches, seconds)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    cut = max(1, x.shape[0] * 3 // 4)
    train, judge = perm[:cut], perm[cut:] if cut < x.shape[0] else perm[:cut]
    # Autograd saves the tokens and the routing mask: inside the caller's inference mode they
    # would be inference tensors, so the copies are made outside it.
    with torch.inference_mode(False):
        x, y = x.float().clone(), y.float().clone()
        chosen = expert_mask(x, w.router_w, w.router_b, w.experts, top_k)
        # Equal-sized batches: the core draws them uniformly, so every training token weighs the same.
        parts = [(x[i], y[i], chosen[i]) for i in train.tensor_split(-(-len(train) // batch))]
        held = (x[judge], y[judge], chosen[judge])

    def run(live: dict[str, torch.Tensor], xb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_ffn(xb, live["w1"], live["b1"], live["w2t"], live["b2"], live["offsets"], mask, w.shared,
                          activation)

    def loss(live: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        xb, yb, mask = parts[i]
        return (run(live, xb, mask) - yb).pow(2).mean()

    def held_out(live: dict[str, torch.Tensor]) -> float:
        return float(relative_error(run(live, held[0], held[2]), held[1]))

    params = {k: getattr(w, k) for k in ("w1", "b1", "w2t", "b2", "offsets")}
    state, log = distill(params, loss, held_out, steps, len(parts), lr, seed, checks=20)
    # The router stays: the experts were trained for the tokens it sends them.
    trained = ExpertWeights(**{k: v.contiguous() for k, v in state.items()}, router_w=w.router_w,
                            router_b=w.router_b, shared=w.shared, experts=w.experts)
    return trained, {"held_out_rel_sq_err_before": log["held_out_before"],
                     "held_out_rel_sq_err_after": log["held_out_after"], "steps": steps, "batches": len(parts),
                     "seconds": log["seconds"]}
