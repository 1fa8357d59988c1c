"""ditopt: capture, calibrate, rewrite, verify and export Diffusion Transformers.

    import ditopt
    pipe.transformer = ditopt.optimize(pipe.transformer, "identity")
"""

from ._version import __version__ as __version__  # re-exported

from .backends import BackendError

from .calibration.pipeline import PipelineSampler
from .capture import capture
from .errors import (
    ArtifactError,
    CalibrationError,
    CaptureError,
    DitoptError,
    InputMismatchError,
    InvalidProfileError,
    MissingInputsError,
    NonFiniteError,
    QualityGateError,
    QualityGateWarning,
    UnknownPassError,
    UnsupportedModelError,
)
from .graph import DiTGraph
from .optimize import OptimizationReport, optimize, profile_from_report
from .profiles import Profile, load_profile
from .registry import PassConfig, PassContext, PassLevel, PassOutcome, PassResult, SearchContext, register_pass
from .runtime import OptimizedDiT

__all__ = [
    "ArtifactError",
    "BackendError",
    "CalibrationError",
    "CaptureError",
    "DiTGraph",
    "DitoptError",
    "InputMismatchError",
    "InvalidProfileError",
    "MissingInputsError",
    "NonFiniteError",
    "OptimizationReport",
    "OptimizedDiT",
    "PassConfig",
    "PassContext",
    "PassLevel",
    "PassOutcome",
    "PassResult",
    "PipelineSampler",
    "Profile",
    "QualityGateError",
    "QualityGateWarning",
    "SearchContext",
    "UnknownPassError",
    "UnsupportedModelError",
    "capture",
    "load_profile",
    "optimize",
    "profile_from_report",
    "register_pass",
]
