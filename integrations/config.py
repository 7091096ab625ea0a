"""What a model source tells us: the model, how to feed it, and what to differentiate.

:class:`DataConfig` is the part :func:`~nnsim_hooks.integrations.load_dataset` needs to
turn files into tensors the model accepts; :class:`LoadedModel` bundles it with the
model and the suggested ``output=`` / ``layers=`` for :func:`nnsim_hooks.attach`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Tuple, Union

import torch.nn as nn

# ImageNet statistics: the default of timm and torchvision classifiers.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTENSITY_MODES = ("normalize", "scale", "none")


@dataclass(frozen=True)
class DataConfig:
    """How inputs must look for a model.

    Attributes:
        channels: input channels C.
        spatial_dims: 2 for images ``[C, H, W]``, 3 for volumes ``[C, D, H, W]``.
        spatial_size: the size inputs are resized to (``(H, W)`` or ``(D, H, W)``), or
            None to keep each file's own size (all files must then share one size).
        mean, std: per-channel statistics for ``intensity="normalize"``.
        intensity: ``"normalize"`` (``(x/255 - mean) / std``, natural images),
            ``"scale"`` (min-max to [0, 1] per sample, MONAI's ``ScaleIntensity``) or
            ``"none"``.
        interpolation: resize interpolation for 2-D images (``bilinear``, ``bicubic``...).
        crop_pct: 2-D images are resized to ``size / crop_pct`` then centre-cropped
            to ``size`` (timm's and torchvision's evaluation transform).
    """

    channels: int = 3
    spatial_dims: int = 2
    spatial_size: Optional[Tuple[int, ...]] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    intensity: str = "normalize"
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    #: the library's own configuration, when it has one (timm's resolved data config)
    extra: Dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {self.spatial_dims}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.spatial_size is not None and len(self.spatial_size) != self.spatial_dims:
            raise ValueError(
                f"spatial_size {self.spatial_size} has {len(self.spatial_size)} dimensions but spatial_dims is "
                f"{self.spatial_dims}"
            )

    @property
    def input_size(self) -> Optional[Tuple[int, ...]]:
        """``(C, *spatial_size)``, timm's convention, or None when the size is free."""
        return None if self.spatial_size is None else (self.channels, *self.spatial_size)

    def describe(self) -> str:
        shape = {1: "L", 2: "H, W", 3: "D, H, W"}[self.spatial_dims]
        size = "" if self.spatial_size is None else f" with spatial size {tuple(self.spatial_size)}"
        return f"{self.spatial_dims}-D inputs [C={self.channels}, {shape}]{size}"

    def with_size(self, spatial_size: Optional[Union[int, Tuple[int, ...]]]) -> "DataConfig":
        """A copy resized to ``spatial_size`` (an int means the same size on every axis)."""
        if spatial_size is None:
            return self
        if isinstance(spatial_size, int):
            spatial_size = (spatial_size,) * self.spatial_dims
        return replace(self, spatial_size=tuple(int(s) for s in spatial_size))


@dataclass
class LoadedModel:
    """A model ready for :func:`nnsim_hooks.attach`, with what it needs around it.

    Attributes:
        model: the network, in eval mode, on the CPU.
        data_config: how to turn files into inputs (see :class:`DataConfig`).
        source: ``timm``, ``torchvision``, ``monai``, ``bundle`` or ``callable``.
        name: the model's name in its source (or the bundle folder, or the function).
        output: the suggested ``output=`` for attach (``"auto"`` for classifiers, a
            reduction from :mod:`nnsim_hooks.integrations.dense_outputs` for dense outputs).
        layers: the suggested ``layers=`` (None: every trainable parameter, as in the paper).
        task: ``classification``, ``segmentation`` or ``unknown``.
        num_classes: the number of output classes or channels, when known.
        checkpoint: the checkpoint loaded into the model, if any.
    """

    model: nn.Module
    data_config: DataConfig
    source: str
    name: str
    output: Any = "auto"
    layers: Any = None
    task: str = "classification"
    num_classes: Optional[int] = None
    checkpoint: Optional[str] = None
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return self.name if self.source in ("bundle", "callable") else f"{self.source}:{self.name}"

    def attach(self, **options):
        """``nnsim_hooks.attach(self.model, output=self.output, layers=self.layers, **options)``."""
        from nnsim_hooks import attach

        options.setdefault("output", self.output)
        options.setdefault("layers", self.layers)
        return attach(self.model, **options)

    def __repr__(self) -> str:
        return (
            f"LoadedModel({self.spec}, {type(self.model).__name__}, task={self.task}, "
            f"{self.data_config.describe()}, output={getattr(self.output, '__name__', self.output)!r})"
        )
