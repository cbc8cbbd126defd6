"""Errors that dsq reports to users.

Every error a user can cause (a bad recipe, a broken checkpoint, a missing file) is a
:class:`DsqInputError`; the CLI turns it into a one-paragraph message and exit code 2.
A failed gate is not an error: the pipeline returns it and the CLI exits 1.
"""
from __future__ import annotations


class DsqError(Exception):
    """Base class for all dsq errors."""


class DsqInputError(DsqError):
    """Unusable input: recipe, checkpoint, data set or command line (CLI exit code 2)."""


class RecipeError(DsqInputError):
    """A recipe file or a command-line override is invalid."""


class CheckpointError(DsqInputError):
    """A model checkpoint directory cannot be loaded."""


class DataError(DsqInputError):
    """A benchmark or calibration data set cannot be used."""


class TrainingError(DsqError):
    """Training went wrong (non-finite loss, diverged ranks, a model that cannot be sharded)."""


class QuantizationError(DsqError):
    """Quantization produced an invalid result (e.g. a NaN scale); names the tensor."""


class ExportError(DsqError):
    """An ONNX export cannot be built, or does not match PyTorch; names the layer or the figure."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind (temporary files are removed on the way) and exit 128 + signal.

    A ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
