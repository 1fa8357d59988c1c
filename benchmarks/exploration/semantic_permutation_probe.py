"""Exploration for the optional Sparse VideoGen2 item of the attention issue: does a semantic
permutation (k-means clusters of queries and of keys, tokens sorted by cluster, blocks of 16)
let PISA's top-rho block selection keep more attention mass than 4x4 spatial tiles (blocks of
16) on dit-digits? q, k, v of every block's self-attention on every 10th denoiser call of two
held-out samples; mass kept = softmax mass of image queries on the selected key blocks.

    python benchmarks/exploration/semantic_permutation_probe.py

Output: benchmarks/results/exploration/semantic_permutation_probe_dit-digits.log (stdout, as run).
"""
import torch
from explore_setup import setup
from ditopt.kernels.block_sparse import block_stats, select_blocks
from ditopt.kernels.layout import tile_permutation
torch.manual_seed(0)
b, m, calA, val = setup("dit-digits")
caps = {}
H = m.config.num_attention_heads
def hook(name):
    def f(mod, inp, out):
        caps.setdefault(name, []).append(out.detach())
    return f
for i, blk in enumerate(m.transformer_blocks):
    for nm in ("to_q", "to_k", "to_v"):
        getattr(blk.attn1, nm).register_forward_hook(hook((i, nm)))
b.sample([3, 7], [300000, 300001], model=m)
calls = len(caps[(0, "to_q")])
print("calls", calls)

def kmeans_order(x, c, euclid, iters=10):
    # x [N, D] -> order sorting tokens by cluster id (cosine k-means on normalized vectors)
    xn = x if euclid else torch.nn.functional.normalize(x, dim=-1)
    cent = xn[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:c]].clone()
    for _ in range(iters):
        a = torch.cdist(xn, cent).argmin(-1) if euclid else (xn @ cent.T).argmax(-1)
        for j in range(c):
            sel = xn[a == j]
            if len(sel):
                cent[j] = sel.mean(0) if euclid else torch.nn.functional.normalize(sel.mean(0), dim=0)
    return torch.argsort(a, stable=True)

def mass(q, k, v, rho, bs, qord=None, kord=None):
    scale = q.shape[-1] ** -0.5
    if qord is not None:
        q = torch.stack([q[:, h].index_select(1, qord[h]) for h in range(q.shape[1])], 1)
        k = torch.stack([k[:, h].index_select(1, kord[h]) for h in range(k.shape[1])], 1)
        v = torch.stack([v[:, h].index_select(1, kord[h]) for h in range(v.shape[1])], 1)
    probs = torch.softmax(scale * q @ k.transpose(-1, -2), -1)
    kc, _, _, hm = block_stats(k, v, bs)
    _, sel = select_blocks(q, kc, hm, bs, rho, scale)
    n = q.shape[2]; blk = torch.arange(n) // bs
    keep = sel[:, :, blk][..., blk]
    return float((probs * keep).sum(-1).mean())

res = {}
for c in range(0, calls, 10):
    for i in range(len(m.transformer_blocks)):
        q, k, v = (caps[(i, nm)][c][:1] for nm in ("to_q", "to_k", "to_v"))
        N, Dm = q.shape[1], q.shape[2]
        q, k, v = (x.view(1, N, H, Dm // H).transpose(1, 2).float() for x in (q, k, v))
        order = tile_permutation(16, 16, 4)
        qs, ks, vs = (x.index_select(2, order) for x in (q, k, v))
        for rho in (0.125, 0.25):
            res.setdefault(("tile4", rho), []).append(mass(qs, ks, vs, rho, 16))
            for euclid in (False, True):
                qo = [kmeans_order(q[0, h], N // 16, euclid) for h in range(H)]
                ko = [kmeans_order(k[0, h], N // 16, euclid) for h in range(H)]
                label = "kmeans16-euclid" if euclid else "kmeans16-cosine"
                res.setdefault((label, rho), []).append(mass(q, k, v, rho, 16, qo, ko))
for key, vals in sorted(res.items()):
    print(key, "mean kept mass %.3f" % (sum(vals) / len(vals)))
