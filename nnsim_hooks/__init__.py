"""nnsim_hooks: input similarity from the neural network's perspective.

Charpiat et al., NeurIPS 2019: two inputs are similar for a network when a parameter
change that moves the output for one moves the output for the other too, i.e. the
cosine between their per-sample parameter gradients.

    >>> import nnsim_hooks
    >>> with nnsim_hooks.attach(model.eval()) as h:
    ...     sims = h.similarity(images)
"""

from .attach import Handle, attach, detach
from .errors import (
    AttachError,
    BatchCouplingError,
    CliError,
    DataError,
    DistributedError,
    ExtractionError,
    IndexMismatchError,
    InputError,
    ModelError,
    NnsimError,
    NonFiniteGradientError,
    NonFiniteInputError,
    OptionalDependencyError,
    OutputSpecError,
    StoreError,
)
from .index import GradientIndex, load_index
from .rules import LayerRule, add_rule, register_rule
from . import training
from . import audit  # the package is callable: nnsim_hooks.audit(model, dataset)

from .version import __version__

__all__ = [
    "attach",
    "detach",
    "audit",
    "Handle",
    "load_index",
    "GradientIndex",
    "LayerRule",
    "register_rule",
    "add_rule",
    "NnsimError",
    "InputError",
    "OutputSpecError",
    "AttachError",
    "ModelError",
    "BatchCouplingError",
    "NonFiniteGradientError",
    "NonFiniteInputError",
    "IndexMismatchError",
    "StoreError",
    "ExtractionError",
    "DataError",
    "DistributedError",
    "OptionalDependencyError",
    "CliError",
]
