"""Lazy imports of the optional libraries, with a message naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# Which extra of nnsim_hooks brings each optional library.
EXTRAS = {"timm": "timm", "monai": "monai", "nibabel": "monai", "PIL": "audit"}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS.get(top, top)
        raise ImportError(
            f"{purpose} needs the optional package '{top}', which is not installed ({exc}). "
            f"Install it with: pip install 'nnsim_hooks[{extra}]'"
        ) from exc
