"""ditopt's pass families. Each module registers its passes with ditopt.registry on import;
the core finds this package through the `ditopt.plugins` entry point."""

from ditopt.passes import caching  # noqa: F401
from ditopt.passes import attention  # noqa: F401
from ditopt.passes import conditioning_memo  # noqa: F401
from ditopt.passes import patch_layout  # noqa: F401
from ditopt.passes import pruning  # noqa: F401
from ditopt.passes import quantization  # noqa: F401
from ditopt.passes import moe  # noqa: F401
