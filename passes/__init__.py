"""ditopt's pass families. Each module registers its passes with ditopt.registry on import;
the core finds this package through the `ditopt.plugins` entry point."""

from . import caching  # noqa: F401
from . import attention  # noqa: F401
