"""ditopt.kernels: attention kernels for the attention-substitution passes.

* :mod:`.layout` -- tile-major token permutation (row-major <-> tile-major).
* :mod:`.neighborhood` -- tiled 2-D neighbourhood attention (reference + fast CPU path).
* :mod:`.block_sparse` -- PISA block-sparse top-rho attention with first-order compensation.
* :mod:`.triton_kernels` -- Triton versions (CUDA; CPU via ``TRITON_INTERPRET=1``), imported lazily.
* :mod:`.ops` -- ``torch.ops.ditopt.neighborhood_attention`` / ``block_sparse_attention`` custom ops.
* :mod:`.bench` -- :func:`bench_attention` for ``ditopt bench attention``.

Importing this package registers the custom ops; it does not import triton.
"""
from .layout import (inverse_tile_permutation, permute_from_tiles, permute_to_tiles, tile_grid,
                     tile_major_coords, tile_permutation)
from .neighborhood import (clear_workspace, neighborhood_attention_cpu, neighborhood_attention_reference, neighborhood_density,
                           neighborhood_mask)
from .block_sparse import (block_sparse_attention_cpu, block_sparse_attention_reference, block_stats,
                           select_blocks)
from .ops import block_sparse_attention, neighborhood_attention


def bench_attention(*args, **kwargs):
    """See :func:`ditopt.kernels.bench.bench_attention`."""
    from .bench import bench_attention as _b
    return _b(*args, **kwargs)


__all__ = [
    "tile_grid", "tile_permutation", "inverse_tile_permutation", "tile_major_coords",
    "permute_to_tiles", "permute_from_tiles",
    "neighborhood_attention", "neighborhood_attention_cpu", "neighborhood_attention_reference",
    "neighborhood_density", "neighborhood_mask",
    "block_sparse_attention", "block_sparse_attention_cpu", "block_sparse_attention_reference",
    "block_stats", "select_blocks", "bench_attention", "clear_workspace",
]
