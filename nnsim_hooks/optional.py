"""Lazy imports of the optional libraries, with one message naming the extra to install.

The core needs only torch, numpy, opacus, FAISS and tqdm; the rest is imported where it
is used, through :func:`require`, so that a missing library says which
``pip install 'nnsim_hooks[EXTRA]'`` brings it instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Iterable, Optional

from .errors import OptionalDependencyError

#: which extra of nnsim_hooks (pyproject.toml's optional-dependencies) brings each library
EXTRAS = {
    "timm": "timm",
    "monai": "monai",
    "nibabel": "monai",
    "pandas": "audit",
    "pyarrow": "audit",
    "matplotlib": "audit",
    "sklearn": "audit",
    "scipy": "audit",
    "PIL": "audit",
    "datasets": "hf",
    "webdataset": "webdataset",
    "braceexpand": "webdataset",
    "fiftyone": "fiftyone",
}

#: the name pip knows a library by, where it differs from its import name
PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow"}


def install_hint(extra: str) -> str:
    return f"pip install 'nnsim_hooks[{extra}]'"


def _import(module: str) -> ModuleType:
    # Through builtins.__import__, as an ``import`` statement goes (importlib.import_module
    # would not), so that anything hooked there sees these imports too.
    __import__(module)
    return sys.modules[module]


def require(module: str, purpose: str, extra: Optional[str] = None) -> ModuleType:
    """Import ``module``, or raise :class:`~nnsim_hooks.errors.OptionalDependencyError`
    saying that ``purpose`` needs it and which extra installs it (``extra``, by default
    looked up in :data:`EXTRAS`)."""
    try:
        return _import(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = extra or EXTRAS.get(top, top)
        raise OptionalDependencyError(
            f"{purpose} needs the optional package '{PIP_NAMES.get(top, top)}', which is not installed ({exc}). "
            f"Install it with: {install_hint(extra)}"
        ) from exc


def require_all(modules: Iterable[str], purpose: str, extra: str) -> None:
    """Check that every one of ``modules`` imports, and name all the missing ones in one
    :class:`~nnsim_hooks.errors.OptionalDependencyError` (one install fixes them all)."""
    missing = []
    for module in modules:
        try:
            _import(module)
        except ImportError:
            missing.append(PIP_NAMES.get(module, module))
    if missing:
        raise OptionalDependencyError(
            f"{purpose} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed. "
            f"Install it with: {install_hint(extra)}"
        )
