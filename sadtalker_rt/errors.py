"""Typed errors: one sentence for the user, one exit code per class of failure."""
from __future__ import annotations


class SadTalkerError(Exception):
    """Base class; ``str(err)`` is the one line shown to the user."""

    exit_code = 1


class UsageError(SadTalkerError):
    """Options that contradict each other or are out of range."""

    exit_code = 2


class InputError(SadTalkerError):
    """An image or audio file that is missing, empty, corrupt or unusable (no face, too short)."""

    exit_code = 3


class WeightsError(SadTalkerError):
    """Checkpoints, ONNX graphs or engines that are missing, damaged or of the wrong kind."""

    exit_code = 4


class EnvironmentProblem(SadTalkerError):
    """A missing optional dependency or device (TensorRT, a GPU, an encoder)."""

    exit_code = 5


class OutputError(SadTalkerError):
    """The output location cannot be written (exists, read-only, full disk)."""

    exit_code = 6
