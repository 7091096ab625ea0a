"""``output=`` reductions for dense (segmentation) outputs ``[B, C, *spatial]``.

The similarity needs one value (or d values) per sample; a segmentation network gives
a map per class. Three reductions, each a callable ``fn(outputs, targets) -> Tensor``
to pass as ``nnsim_hooks.attach(model, output=...)``:

- :class:`foreground_sum`: the sum of the foreground logits over all voxels, one
  value per sample (the default for segmentation models);
- :class:`region_sum`: the same inside a region of interest (a mask or a box);
- :class:`per_class`: one sum per class, d values per sample, for the whitened
  matrix similarity ``Tr(K_C)/d`` (the paper section 1).

Dict outputs (torchvision's ``{"out": ..., "aux": ...}``) are read at ``key``
(``"out"`` by default); tuple or list outputs (deep supervision) at index 0.
Each reduction has a descriptive ``__name__`` that goes into index fingerprints, so
that features made with another reduction are not mixed with these.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from nnsim_hooks.errors import OutputSpecError

Box = Sequence[Tuple[int, int]]


class DenseReduction:
    """Common part: find the dense tensor and the channels to keep."""

    def __init__(self, channels: Optional[Sequence[int]] = None, background: Optional[int] = 0,
                 key: Optional[Union[str, int]] = None):
        self.channels = None if channels is None else [int(c) for c in channels]
        self.background = background
        self.key = key

    # A readable, stable name for fingerprints and reports.
    @property
    def __name__(self) -> str:  # type: ignore[override]
        parts = []
        if self.channels is not None:
            parts.append(f"channels={self.channels}")
        elif self.background is not None:
            parts.append(f"background={self.background}")
        if self.key is not None:
            parts.append(f"key={self.key!r}")
        parts += self._extra_name()
        return f"{type(self).__name__}({', '.join(parts)})"

    def _extra_name(self):
        return []

    def __repr__(self) -> str:
        return self.__name__

    def dense(self, outputs) -> torch.Tensor:
        x = outputs
        if isinstance(x, dict):
            key = self.key if self.key is not None else "out"
            if key not in x:
                raise OutputSpecError(f"{self.__name__}: the model returned a dict with keys {list(x)}; pass key=...")
            x = x[key]
        elif isinstance(x, (tuple, list)):
            x = x[self.key if isinstance(self.key, int) else 0]
        if not torch.is_tensor(x) or x.dim() < 2:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise OutputSpecError(
                f"{self.__name__} needs outputs [B, C, *spatial] (class maps), got {shape}; for a classifier use "
                "output='auto'"
            )
        return x

    def selected(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C', *spatial]``: the kept channels."""
        c = x.shape[1]
        if self.channels is not None:
            bad = [k for k in self.channels if not -c <= k < c]
            if bad:
                raise OutputSpecError(f"{self.__name__}: channels {bad} do not exist in outputs with {c} channels")
            return x[:, self.channels]
        if self.background is None or c == 1:
            return x  # one channel (sigmoid output): it is the foreground
        keep = [k for k in range(c) if k != self.background % c]
        return x[:, keep]


class foreground_sum(DenseReduction):  # noqa: N801 - reads like the other output names
    """Sum of the foreground logits over all positions: ``[B]``.

    Args:
        channels: the channels to sum; default every channel but ``background``
            (a single-channel output is summed as it is).
        background: the background channel (None: keep every channel).
        key: where to read a dict or tuple output.
    """

    def __call__(self, outputs, targets=None) -> torch.Tensor:
        x = self.selected(self.dense(outputs))
        return x.reshape(x.shape[0], -1).sum(1)


class per_class(DenseReduction):  # noqa: N801
    """One sum per kept class: ``[B, C']``, the d-output (matrix) similarity."""

    def __call__(self, outputs, targets=None) -> torch.Tensor:
        x = self.selected(self.dense(outputs))
        return x.reshape(x.shape[0], x.shape[1], -1).sum(2)


class region_sum(DenseReduction):  # noqa: N801
    """Sum of the foreground logits inside a region of interest: ``[B]``.

    Args:
        mask: a ``[*spatial]`` tensor (bool or weights) multiplied with every kept channel.
        box: or ``[(start, stop), ...]``, one pair per spatial axis (Python slice bounds).
        channels, background, key: as for :class:`foreground_sum`.
    """

    def __init__(self, mask: Optional[torch.Tensor] = None, box: Optional[Box] = None, **kwargs):
        super().__init__(**kwargs)
        if (mask is None) == (box is None):
            raise OutputSpecError("region_sum needs exactly one of mask= or box=")
        self.mask = None if mask is None else torch.as_tensor(mask)
        self.box = None if box is None else [(int(a), int(b)) for a, b in box]

    def _extra_name(self):
        if self.box is not None:
            return [f"box={self.box}"]
        m = self.mask
        return [f"mask={tuple(m.shape)}:{int((m != 0).sum())}"]

    def __call__(self, outputs, targets=None) -> torch.Tensor:
        x = self.selected(self.dense(outputs))
        spatial = tuple(x.shape[2:])
        if self.box is not None:
            if len(self.box) != len(spatial):
                raise OutputSpecError(
                    f"{self.__name__}: the box has {len(self.box)} axes but the outputs have spatial shape {spatial}"
                )
            index = (slice(None), slice(None)) + tuple(slice(a, b) for a, b in self.box)
            region = x[index]
            if region.numel() == 0:
                raise OutputSpecError(f"{self.__name__}: the box selects nothing in spatial shape {spatial}")
            return region.reshape(x.shape[0], -1).sum(1)
        if tuple(self.mask.shape) != spatial:
            raise OutputSpecError(
                f"{self.__name__}: the mask has shape {tuple(self.mask.shape)} but the outputs have spatial shape "
                f"{spatial}; give a mask of the output's size"
            )
        mask = self.mask.to(device=x.device, dtype=x.dtype)
        return (x * mask).reshape(x.shape[0], -1).sum(1)
