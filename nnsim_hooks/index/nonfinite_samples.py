"""Samples whose input or per-sample gradient holds NaN or Inf, in an index build.

Such a sample has no gradient direction, so the build stores it as it stores a sample
with a zero gradient (features zero, ``valid`` False) and marks it by a NaN gradient
norm (``norms``): the audit reads them back there, skips and counts them. Its
prediction is -1 (none) and its probabilities and outputs are NaN. The other samples of
its batch are extracted without it, so their rows are what a build without it gives.

Only the build skips: ``handle.features()`` / ``handle.extract()`` on a batch still raise
:class:`~nnsim_hooks.errors.NonFiniteGradientError` (a caller holding one batch decides).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..data import batching
from ..errors import NonFiniteGradientError


def nonfinite_inputs(inputs: Any, n: int) -> torch.Tensor:
    """``[n]`` bool: samples whose floating-point input tensors hold a NaN or an Inf."""
    bad = torch.zeros(n, dtype=torch.bool)
    tensors = [inputs] if torch.is_tensor(inputs) else list(inputs.values()) if isinstance(inputs, dict) else \
        list(inputs) if isinstance(inputs, (tuple, list)) else []
    for t in tensors:
        if torch.is_tensor(t) and t.is_floating_point() and t.dim() >= 1 and len(t) == n:
            bad |= ~torch.isfinite(t.reshape(n, -1)).all(1).cpu()
    return bad


def extract_finite(handle, inputs: Any, targets: Any, n: int):
    """``(batches, keep)``: :meth:`Handle.extract` of the samples of the batch whose inputs
    and gradients are finite (a list of FeatureBatch, one per chunk of the handle's
    batch size, empty when none is), and their positions ``keep`` (int64 tensor)."""
    bad = nonfinite_inputs(inputs, n)
    parts: List[Any] = []
    kept: List[torch.Tensor] = []
    for start, end in batching.chunks(n, handle.batch_size):
        chunk = torch.arange(start, end)
        while True:  # each failed try names at least one sample more
            keep = chunk[~bad[chunk]]
            if len(keep) == 0:
                break
            whole = len(keep) == n
            try:
                fb = handle.extract(inputs if whole else batching.take(inputs, keep),  # CPU ids index GPU tensors
                                    targets if whole else batching.take(targets, keep))
            except NonFiniteGradientError as exc:
                if not exc.samples:
                    raise
                bad[keep[list(exc.samples)]] = True
                continue
            parts.append(fb)
            kept.append(keep)
            break
    return parts, torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64)


#: What a skipped sample holds in each stored column (``labels``: its target, set apart).
BLANK = {"features": 0.0, "valid": False, "norms": np.nan, "predictions": -1, "probabilities": np.nan,
         "outputs": np.nan}


def blank_rows(specs: Dict[str, Tuple[str, tuple]], n: int) -> Dict[str, np.ndarray]:
    """``n`` rows of skipped samples for columns ``name -> (dtype, row shape)``."""
    return {name: np.full((n, *shape), BLANK.get(name, 0), dtype=dtype) for name, (dtype, shape) in specs.items()}


def fill_rows(good: Dict[str, np.ndarray], keep: np.ndarray, n: int,
              blank: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """Rows of a whole batch of ``n``: ``good`` at positions ``keep``, blank rows elsewhere."""
    rows = blank if blank is not None else blank_rows({k: (v.dtype.name, v.shape[1:]) for k, v in good.items()}, n)
    for name, values in good.items():
        rows[name][keep] = values
    return rows
