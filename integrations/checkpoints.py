"""Loading a local checkpoint into a model, safely and with a clear account of mismatches.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickled code. The usual wrappers are unwrapped
(``{"state_dict": ...}``, ``{"model": ...}``, Lightning's ``model.`` prefix, the
``module.`` prefix of DataParallel, the ``_orig_mod.`` prefix of ``torch.compile``).
A checkpoint that does not fit the architecture is refused, naming the missing,
unexpected and shape-mismatched keys.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Mapping

import torch
import torch.nn as nn

from nnsim_hooks.errors import DataError, ModelError

logger = logging.getLogger(__name__)

# Keys under which training scripts commonly nest the weights, most specific first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "network", "net", "state_dict_ema", "model_ema")
# Prefixes added by wrappers around the model.
PREFIXES = ("module.", "_orig_mod.", "model.")
SHOW = 8  # how many keys an error message lists per kind


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from common containers."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickled modules, RuntimeError for corrupt files
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise DataError(
                f"checkpoint '{path}' holds pickled Python objects, which torch.load(weights_only=True) refuses "
                "for safety. Save the weights alone with torch.save(model.state_dict(), path) and pass that file."
            ) from exc
        raise DataError(f"checkpoint '{path}' cannot be read by torch.load: {exc}") from exc
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj, path: str = "<checkpoint>") -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only never returns a module
        obj = obj.state_dict()
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        nested = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            raise DataError(
                f"checkpoint '{path}' is a dict whose values are not tensors and which has none of the keys "
                f"{list(WRAPPER_KEYS)}; its keys are {sorted(map(str, obj))[:SHOW]}. Pass a state_dict."
            )
        logger.debug("checkpoint %s: using the weights under key %r", path, nested)
        obj = obj[nested]
    if not isinstance(obj, Mapping):
        raise DataError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a state_dict of tensors")
    return {str(k): v for k, v in obj.items() if torch.is_tensor(v)}


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _strip_prefixes(state: Dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove wrapper prefixes when doing so makes the keys match the model's."""
    for _ in range(len(PREFIXES)):
        if set(state) & set(expected):
            return state
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                break
        else:
            return state
    return state


def load_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (strictly) and return the model.

    Raises :class:`~nnsim_hooks.errors.ModelError` naming the mismatched keys when the
    checkpoint does not fit, :class:`~nnsim_hooks.errors.DataError` when the file
    cannot be read.
    """
    expected = model.state_dict()
    state = _strip_prefixes(read_state_dict(path), expected)
    problems = mismatches(state, expected)
    if problems:
        raise ModelError(
            f"checkpoint '{path}' does not match the architecture of {type(model).__name__}: "
            + "; ".join(problems)
            + ". Check the model name, --num-classes and --model-kwargs against those used for training."
        )
    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors from %s", len(state), path)
    return model


def mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> List[str]:
    """Human-readable lines for missing, unexpected and shape-mismatched keys."""

    def show(keys):
        keys = sorted(keys)
        more = f" and {len(keys) - SHOW} more" if len(keys) > SHOW else ""
        return ", ".join(keys[:SHOW]) + more

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    out = []
    if missing:
        out.append(f"{len(missing)} missing key(s): {show(missing)}")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
    if shapes:
        out.append(f"{len(shapes)} shape mismatch(es): {show(shapes)}")
    return out
