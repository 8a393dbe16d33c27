"""Errors lowbit raises for bad input. The CLI prints them as one line and exits with status 2."""


class LowbitError(Exception):
    """Base class: a problem with the user's input, stated in one line."""


class SpecError(LowbitError, ValueError):
    """A quantization spec that cannot work (bits out of range, bad group size, ...)."""


class UnsupportedArchitectureError(LowbitError):
    """A model_type no adapter table describes."""


class GroupSizeError(SpecError):
    """A group size that does not divide a layer's input features."""


class InvalidWeightsError(LowbitError, ValueError):
    """NaN or Inf in a weight, or a weight of an unexpected shape."""


class CalibrationError(LowbitError, ValueError):
    """Empty or too short calibration data."""


class CheckpointError(LowbitError):
    """A missing, corrupt, truncated, pickled or mismatched checkpoint."""


class OutputExistsError(LowbitError, FileExistsError):
    """The output directory already exists and overwrite was not asked for."""
