"""torchvision: ``torchvision:NAME`` with random weights (``weights=None``) or a local checkpoint.

The data config comes from the model's default weights' own preprocessing
(``Weights.DEFAULT.transforms()``: resize, crop, mean, std), read without downloading
anything. Classification, semantic segmentation (outputs ``{"out": ...}``) and video
classification (``[B, 3, T, H, W]``, 3-D) models are supported; detection and optical
flow models take lists of images or image pairs and are refused with a message.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, Optional

from nnsim_hooks.errors import ModelError

from .checkpoints import load_checkpoint
from .config import IMAGENET_MEAN, IMAGENET_STD, DataConfig, LoadedModel
from .names import unknown_name_message
from .dense_outputs import foreground_sum

logger = logging.getLogger(__name__)

UNSUPPORTED = {
    "detection": "detection models take a list of images and return boxes",
    "optical_flow": "optical-flow models take pairs of images",
}


def _family(builder) -> str:
    """``classification``, ``segmentation``, ``video``, ``quantization``, ``detection``..."""
    module = builder.__module__.split(".")
    return module[2] if len(module) > 3 else "classification"


def load_torchvision(
    name: str,
    *,
    model_kwargs: Optional[Dict[str, Any]] = None,
    checkpoint: Optional[str] = None,
    num_classes: Optional[int] = None,
) -> LoadedModel:
    """Build torchvision model ``name`` with ``weights=None`` (nothing is downloaded),
    load ``checkpoint`` if given, and return it in eval mode."""
    import torchvision.models as tvm

    available = tvm.list_models()
    if name.lower() not in available:
        raise ModelError(
            unknown_name_message(
                "torchvision", name, available, "list them with python -c \"import torchvision; "
                "print(torchvision.models.list_models())\""
            )
        )
    name = name.lower()
    builder = tvm.get_model_builder(name)
    family = _family(builder)
    if family in UNSUPPORTED:
        raise ModelError(
            f"torchvision model '{name}' is not supported: {UNSUPPORTED[family]}, while similarities need one "
            "tensor batch in and one tensor per sample out. Wrap it in a module of your own and pass it as "
            "package.module:function."
        )
    kwargs = dict(model_kwargs or {})
    kwargs["weights"] = None
    params = inspect.signature(builder).parameters
    if "weights_backbone" in params:
        kwargs.setdefault("weights_backbone", None)  # segmentation backbones would download ImageNet weights
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if family == "segmentation":
        kwargs.setdefault("aux_loss", False)
    if family == "quantization":
        kwargs.setdefault("quantize", False)
    try:
        model = builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"torchvision model '{name}' does not accept model_kwargs {kwargs}: {exc}") from exc
    if checkpoint:
        load_checkpoint(model, checkpoint)
    model.eval()
    config = torchvision_data_config(name, family)
    classes = kwargs.get("num_classes") or _default_classes(builder)
    segmentation = family == "segmentation"
    return LoadedModel(
        model=model,
        data_config=config,
        source="torchvision",
        name=name,
        output=foreground_sum(key="out") if segmentation else "auto",
        layers=None,
        task="segmentation" if segmentation else "classification",
        num_classes=classes,
        checkpoint=checkpoint,
        info={"family": family},
    )


def _default_classes(builder) -> Optional[int]:
    default = inspect.signature(builder).parameters.get("num_classes")
    if default is not None and isinstance(default.default, int):
        return default.default
    return None


def torchvision_data_config(name: str, family: str = "classification") -> DataConfig:
    """The preprocessing of the model's default weights, as a :class:`DataConfig`."""
    from torchvision.models import get_model_weights

    try:
        transform = get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError):  # a builder without a weights enum
        transform = None
    crop = getattr(transform, "crop_size", None)
    resize = getattr(transform, "resize_size", None)
    mean = tuple(getattr(transform, "mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(transform, "std", None) or IMAGENET_STD)
    interpolation = getattr(getattr(transform, "interpolation", None), "value", "bilinear")
    if family == "video":
        size = tuple(crop) if crop else (112, 112)
        # Video models see [C, T, H, W]; clips are not loaded from files here, so T is free.
        return DataConfig(channels=3, spatial_dims=3, spatial_size=None, mean=mean, std=std,
                          interpolation=interpolation, extra={"frame_size": size})
    if crop:
        size = crop[0]
        crop_pct = size / resize[0] if resize else 1.0
    else:
        size = resize[0] if resize else 224
        crop_pct = 1.0
    return DataConfig(
        channels=3,
        spatial_dims=2,
        spatial_size=(int(size), int(size)),
        mean=mean,
        std=std,
        intensity="normalize",
        interpolation=interpolation,
        crop_pct=crop_pct,
    )
