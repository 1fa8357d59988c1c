"""Compute cost of a run: multiply-accumulates counted by PyTorch's FlopCounterMode (MACs = FLOPs / 2).

PyTorch's counter has no formula for the CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``), so one is added here (the same formula as
for the CUDA SDPA kernels); without it attention counts as free on CPU. The ``ditopt::``
attention custom ops register their own formulas (``ditopt.kernels.ops``). Elementwise ops,
norms and softmax are not counted (matmuls, convolutions and attention only). Core so that the
passes that search on cost (layer pruning) and the benchmarks count the same way.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

__all__ = ["mac_counter", "segment_macs"]


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


@contextmanager
def mac_counter() -> Iterator[Callable[[], int]]:
    """``with mac_counter() as macs: ...; macs()`` -> multiply-accumulates counted inside."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        yield lambda: counter.get_total_flops() // 2


def segment_macs(seg) -> int:
    """Multiply-adds of one call of a graph segment at its captured shapes."""
    from ditopt.graph import example_args

    with torch.no_grad(), mac_counter() as macs:
        seg.module(*example_args(seg))
    return macs()
