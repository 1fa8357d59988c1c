"""ditopt: capture, calibrate, rewrite, verify and export Diffusion Transformers.

    import ditopt
    pipe.transformer = ditopt.optimize(pipe.transformer, "identity")
"""

__version__ = "0.1.0"

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
from .optimize import OptimizationReport, optimize
from .profiles import Profile, load_profile
from .registry import PassConfig, PassContext, PassResult, register_pass
from .runtime import OptimizedDiT

__all__ = [
    "ArtifactError",
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
    "PassResult",
    "PipelineSampler",
    "Profile",
    "QualityGateError",
    "QualityGateWarning",
    "UnknownPassError",
    "UnsupportedModelError",
    "capture",
    "load_profile",
    "optimize",
    "register_pass",
]
