"""Error types. Each message says what was found and what to do about it."""


class DitoptError(Exception):
    """Base class for every error ditopt raises on purpose."""

    exit_code = 2  # CLI: bad input unless a subclass says otherwise


class UnsupportedModelError(DitoptError):
    """The model is not a diffusion transformer ditopt can recover a block structure from."""


class CaptureError(DitoptError):
    """torch.export could not capture the model with the given inputs."""


class MissingInputsError(DitoptError):
    """The model is not a known diffusers class, so example inputs must be given."""


class InvalidProfileError(DitoptError):
    """A profile is malformed: unknown pass, unknown key, or a bad value."""


class UnknownPassError(InvalidProfileError):
    """A profile names a pass that no installed plugin registers."""


class InputMismatchError(DitoptError):
    """Inputs do not match what a graph, calibration or artifact was built for."""


class CalibrationError(DitoptError):
    """Calibration statistics are missing, stale, or do not cover the requested run."""


class NonFiniteError(DitoptError):
    """A NaN or Inf appeared where it must not."""


class ArtifactError(DitoptError):
    """An export artifact is missing, incomplete, or would be overwritten."""


class QualityGateError(DitoptError):
    """The optimized model misses its quality budget. The model is not lost: `optimized` holds
    it, flagged (`optimized.report.passed` is False), with the report saying what missed."""

    exit_code = 1

    def __init__(self, message: str, optimized: object = None):
        super().__init__(message)
        self.optimized = optimized


class DitoptWarning(UserWarning):
    """Base class for the warnings ditopt gives on purpose (an input it accepts but that is
    probably not what was meant)."""


class ProfileWarning(DitoptWarning):
    """A profile value is accepted but has no effect or is probably a mistake."""


class QualityGateWarning(DitoptWarning):
    """`optimize(..., on_gate_miss="warn")` returned a model that misses its quality budget."""


class MissingExtraError(DitoptError):
    """An optional feature needs a package the default install leaves out (pictures, the zoo's
    digit data, peer baselines): the message names the pip extra that brings it."""


def require_extra(module: str, extra: str, what: str):
    """Import `module`, or raise MissingExtraError saying `pip install "ditopt[extra]"`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs {module.split('.')[0]}, which the default install leaves out; "
                                f"pip install \"ditopt[{extra}]\"") from None
