"""The exceptions nnsim_hooks raises.

Every error says what is wrong, where (module path, shape, file) and how to fix it.
Each class also derives from the closest built-in exception, so ``except ValueError``
keeps working for callers that do not know this package.
"""

from __future__ import annotations


class NnsimError(Exception):
    """Base class of every error raised on purpose by nnsim_hooks."""


class InputError(NnsimError, ValueError):
    """Inputs, targets or queries of the wrong shape, dtype or device."""


class OutputSpecError(NnsimError, ValueError):
    """The ``output=`` function returned something that is not one value (or d values) per sample."""


class AttachError(NnsimError, RuntimeError):
    """The model is already attached, or the handle was already detached."""


class ModelError(NnsimError, RuntimeError):
    """The model cannot be differentiated per sample as it stands (no trainable parameters, ...)."""


class BatchCouplingError(ModelError):
    """A layer mixes the samples of a batch (BatchNorm using batch statistics)."""


class NonFiniteGradientError(NnsimError, FloatingPointError):
    """A per-sample gradient holds NaN or Inf; the message names the module. ``samples``:
    the positions in the batch of every sample found so (empty when not known), which
    the index build uses to skip them."""

    def __init__(self, message: str, samples=()):
        super().__init__(message)
        self.samples = tuple(int(s) for s in samples)


class IndexMismatchError(NnsimError, ValueError):
    """A stored index was built with another model, output or sketch recipe."""


class StoreError(NnsimError, OSError):
    """Reading or writing an index folder failed (disk full, corrupt or missing files)."""


class ExtractionError(NnsimError, RuntimeError):
    """A batch failed while features were extracted; the message names the batch."""


class DataError(NnsimError, ValueError):
    """A dataset, label file or image that cannot be used as given."""


class NonFiniteInputError(DataError):
    """A sample's input holds NaN or Inf values; the message names the file. Audits skip
    and count such samples, as they do unreadable files."""


class DistributedError(NnsimError, RuntimeError):
    """Ranks of a torch.distributed job that did not all reach a step, or failed one."""


class CliError(NnsimError):
    """A problem with the ``nnsim`` command line's arguments or environment (exit code 1)."""


class OptionalDependencyError(NnsimError, ImportError):
    """An optional library is missing; the message names the extra that installs it
    (``pip install 'nnsim_hooks[timm]'``). Raised by :func:`nnsim_hooks.optional.require`."""
