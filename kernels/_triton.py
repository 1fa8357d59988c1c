"""Triton, where it is installed: the kernels' modules define their `@triton.jit` functions only
when HAS_TRITON (CPU installs may lack it; TRITON_INTERPRET=1 runs them on CPU in tests)."""

try:  # pragma: no cover - import guard
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton", "tl"]
