"""ditopt.kernels: attention kernels for the attention-substitution passes.

* :mod:`.layout` -- tile-major token permutation (row-major <-> tile-major).
* :mod:`.neighborhood` -- tiled 2-D neighbourhood attention (reference + fast CPU path).
* :mod:`.block_sparse` -- PISA block-sparse top-rho attention with first-order compensation.
* :mod:`.triton_kernels` -- Triton versions (CUDA; CPU via ``TRITON_INTERPRET=1``), imported lazily.
* :mod:`.quant` -- weight / activation quantizers, Hadamard rotations, ``torch.ops.ditopt.int8_linear`` (W8A8).
* :mod:`.moe` -- ``torch.ops.ditopt.moe_ffn``: a dense FFN split into routed experts (grouped GEMMs; Triton
  grouped GEMM in :mod:`.moe_triton` on CUDA).
* :mod:`.linear_attention` -- linear attention (ReLU / ELU+1 features) with a depthwise value convolution
  (reference + chunked CPU path; Triton in :mod:`.linear_attention_triton`).
* :mod:`.ops` -- ``torch.ops.ditopt.neighborhood_attention`` / ``block_sparse_attention`` / ``linear_attention``
  custom ops.
* :mod:`.bench` -- :func:`bench_attention` for ``ditopt bench attention``.

Importing this package registers the custom ops; it does not import triton.
"""
# Absolute imports on purpose, here and in the __init__ of passes/, export/ and cli/: from a
# checkout's root (`python -m pytest`, `python -c` there) these directories are also importable as
# top-level `kernels`, `passes`, ..., and transformers imports `kernels` to probe for the Hugging
# Face package of that name. Relative imports would then run the submodules a second time,
# re-registering torch.ops.ditopt.* (and the passes) and leaving the ops ditopt already holds
# dangling: a segfault at their next call. Absolute imports keep such an import a thin alias.
from ditopt.kernels.layout import (inverse_tile_permutation, permute_from_tiles, permute_to_tiles, tile_grid,
                     tile_major_coords, tile_permutation)
from ditopt.kernels.neighborhood import (clear_workspace, neighborhood_attention_cpu, neighborhood_attention_reference, neighborhood_density,
                           neighborhood_mask)
from ditopt.kernels.block_sparse import (block_sparse_attention_cpu, block_sparse_attention_reference, block_stats,
                           select_blocks)
from ditopt.kernels.linear_attention import linear_attention_cpu, linear_attention_reference
from ditopt.kernels.ops import block_sparse_attention, linear_attention, neighborhood_attention


def bench_attention(*args, **kwargs):
    """See :func:`ditopt.kernels.bench.bench_attention`."""
    from ditopt.kernels.bench import bench_attention as _b
    return _b(*args, **kwargs)


__all__ = [
    "tile_grid", "tile_permutation", "inverse_tile_permutation", "tile_major_coords",
    "permute_to_tiles", "permute_from_tiles",
    "neighborhood_attention", "neighborhood_attention_cpu", "neighborhood_attention_reference",
    "neighborhood_density", "neighborhood_mask",
    "block_sparse_attention", "block_sparse_attention_cpu", "block_sparse_attention_reference",
    "block_stats", "select_blocks", "bench_attention", "clear_workspace",
    "linear_attention", "linear_attention_cpu", "linear_attention_reference",
]
