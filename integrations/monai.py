"""MONAI: ``monai:NAME`` networks built from keyword arguments, and local bundles.

- ``monai:NAME`` is any network in ``monai.networks.nets`` (``DenseNet121``,
  ``resnet18``, ``UNet``, ``SegResNet``, ``BasicUNet``...), built with
  ``model_kwargs`` (``--model-kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2}'``);
  ``num_classes`` fills ``num_classes`` or ``out_channels``, whichever the network takes.
  ``pretrained`` is forced off: nothing is downloaded.
- A **bundle** is a local folder with ``configs/inference.json`` (or ``.yaml``, or
  ``train.*``) defining ``network_def``, optionally ``configs/metadata.json``
  (``network_data_format``: input channels, spatial shape) and ``models/model.pt``.
  The network is built by MONAI's ``ConfigParser``, which evaluates the config's
  ``$`` expressions and ``_target_`` components: only load bundles you trust (the
  same caveat as ``monai.bundle``). The weights are read with
  ``torch.load(weights_only=True)``. The bundle's ``preprocessing`` transforms, when
  present, are used to load its data.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Callable, Dict, Optional

import torch.nn as nn

from nnsim_hooks.errors import DataError, ModelError

from nnsim_hooks.optional import require
from .checkpoints import load_checkpoint
from .config import DataConfig, LoadedModel
from .names import unknown_name_message
from .dense_outputs import foreground_sum

logger = logging.getLogger(__name__)

# Networks whose output is a dense map [B, C, *spatial]: their default output= is the
# foreground sum rather than a classifier's contrast.
SEGMENTATION_NETS = {
    "UNet", "Unet", "BasicUNet", "BasicUnet", "Basicunet", "basicunet", "BasicUNetPlusPlus", "BasicUnetPlusPlus",
    "BasicunetPlusPlus", "basicunetplusplus", "SegResNet", "SegResNetDS", "SegResNetDS2", "UNETR", "SwinUNETR",
    "AttentionUnet", "DynUNet", "DynUnet", "Dynunet", "VNet", "FlexibleUNet", "FlexUNet", "HighResNet", "AHNet",
    "AHnet", "Ahnet", "DiNTS", "MedNeXt", "MedNext", "RegUNet", "LocalNet", "GlobalNet", "Quicknat", "DAF3D",
    "HyenaNDUNETR",
}


def _nets():
    require("monai", "MONAI networks (monai:NAME)")
    import monai.networks.nets as nets

    return nets


def _public_nets(nets) -> Dict[str, Callable]:
    out = {}
    for name in dir(nets):
        obj = getattr(nets, name)
        if name.startswith("_") or not callable(obj):
            continue
        if inspect.isclass(obj) and not issubclass(obj, nn.Module):
            continue
        out[name] = obj
    return out


def load_monai(
    name: str,
    *,
    model_kwargs: Optional[Dict[str, Any]] = None,
    checkpoint: Optional[str] = None,
    num_classes: Optional[int] = None,
) -> LoadedModel:
    """Build ``monai.networks.nets.<name>(**model_kwargs)`` with random weights, load
    ``checkpoint`` if given, and return it in eval mode."""
    nets = _public_nets(_nets())
    if name not in nets:
        lower = {k.lower(): k for k in nets}
        if name.lower() not in lower:
            raise ModelError(
                unknown_name_message("MONAI", name, nets, "see dir(monai.networks.nets) for the networks")
            )
        name = lower[name.lower()]
    builder = nets[name]
    kwargs = _kwargs_for(builder, name, model_kwargs, num_classes)
    try:
        model = builder(**kwargs)
    except TypeError as exc:
        raise ModelError(f"MONAI network '{name}' rejected model_kwargs {kwargs}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"monai.networks.nets.{name} returned a {type(model).__name__}, not a torch module")
    if checkpoint:
        load_checkpoint(model, checkpoint)
    prepare_monai_model(model)
    config = monai_data_config(model, kwargs, builder)
    segmentation = name in SEGMENTATION_NETS or type(model).__name__ in SEGMENTATION_NETS
    classes = kwargs.get("num_classes", kwargs.get("out_channels"))
    return LoadedModel(
        model=model,
        data_config=config,
        source="monai",
        name=name,
        output=foreground_sum() if segmentation else "auto",
        layers=None,
        task="segmentation" if segmentation else "classification",
        num_classes=classes,
        checkpoint=checkpoint,
        info={"model_kwargs": kwargs},
    )


def prepare_monai_model(model: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm and dropout frozen, as the similarity is defined for).

    Nothing else changes: MONAI's InstanceNorm-before-in-place-activation blocks are
    handled by the core (it copies a module output that is a view before hooking it).
    """
    return model.eval()


def _signature(builder) -> inspect.Signature:
    target = builder.__init__ if inspect.isclass(builder) else builder
    return inspect.signature(target)


def _kwargs_for(builder, name: str, model_kwargs, num_classes) -> Dict[str, Any]:
    kwargs = dict(model_kwargs or {})
    params = _signature(builder).parameters
    if "pretrained" in params:
        kwargs["pretrained"] = False  # never download
    if num_classes is not None:
        if "num_classes" in params or "out_channels" not in params:
            kwargs["num_classes"] = int(num_classes)
        else:
            kwargs["out_channels"] = int(num_classes)
    required = [
        p for p, spec in params.items()
        if p != "self" and spec.default is inspect.Parameter.empty
        and spec.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p not in kwargs
    ]
    if required:
        example = json.dumps({p: _EXAMPLES.get(p, "...") for p in required})
        raise ModelError(
            f"MONAI network '{name}' needs the arguments {required}; pass them as model_kwargs "
            f"(on the command line: --model-kwargs '{example}')"
        )
    return kwargs


_EXAMPLES = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64], "strides": [2, 2],
             "img_size": [96, 96, 96], "patch_size": 16, "block": "basic", "layers": [1, 1, 1, 1],
             "block_inplanes": [32, 64, 128, 256]}


def monai_data_config(model: nn.Module, kwargs: Dict[str, Any], builder=None) -> DataConfig:
    """Spatial dims and channels from the arguments (or their defaults), else from the
    first convolution; the size is free unless the network fixes it (``img_size``)."""
    defaults = {}
    if builder is not None:
        defaults = {p: s.default for p, s in _signature(builder).parameters.items()
                    if s.default is not inspect.Parameter.empty}
    merged = {**defaults, **kwargs}
    first = _first_conv(model)
    dims = merged.get("spatial_dims") or merged.get("dimensions")
    if dims is None and first is not None:
        dims = len(first.kernel_size)
    channels = merged.get("in_channels", merged.get("n_input_channels"))
    if channels is None and first is not None:
        channels = first.in_channels
    size = merged.get("img_size")
    dims = int(dims or 3)
    if isinstance(size, int):
        size = (size,) * dims
    return DataConfig(
        channels=int(channels or 1),
        spatial_dims=dims,
        spatial_size=tuple(size) if size is not None else None,
        intensity="scale",
        interpolation="trilinear" if dims == 3 else "bilinear",
    )


def _first_conv(model: nn.Module):
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module
    return None


# -- bundles ---------------------------------------------------------------------------

CONFIG_NAMES = ("inference", "train")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def is_bundle(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "configs"))


def _bundle_config(path: str) -> str:
    configs = os.path.join(path, "configs")
    for stem in CONFIG_NAMES:
        for suffix in CONFIG_SUFFIXES:
            candidate = os.path.join(configs, stem + suffix)
            if os.path.isfile(candidate):
                return candidate
    present = sorted(os.listdir(configs)) if os.path.isdir(configs) else []
    raise DataError(
        f"MONAI bundle '{path}' has no configs/inference.json (or .yaml, or train.json); configs/ holds {present}"
    )


def load_bundle(
    path: str,
    *,
    model_kwargs: Optional[Dict[str, Any]] = None,
    checkpoint: Optional[str] = None,
    num_classes: Optional[int] = None,
) -> LoadedModel:
    """Build a local MONAI bundle's ``network_def`` and load ``models/model.pt`` (or
    ``checkpoint``). ``model_kwargs`` override entries of ``network_def``."""
    require("monai", "MONAI bundles")
    from monai.bundle import ConfigParser

    path = os.path.abspath(path)
    config_file = _bundle_config(path)
    parser = ConfigParser()
    parser.read_config(config_file)
    meta_file = os.path.join(path, "configs", "metadata.json")
    if os.path.isfile(meta_file):
        parser.read_meta(meta_file)
    parser["bundle_root"] = path
    if "network_def" not in parser.config:
        raise DataError(f"MONAI bundle config '{config_file}' defines no 'network_def'")
    for key, value in (model_kwargs or {}).items():
        parser[f"network_def#{key}"] = value
    if num_classes is not None:
        key = "num_classes" if "num_classes" in parser["network_def"] else "out_channels"
        parser[f"network_def#{key}"] = int(num_classes)
    try:
        model = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as exc:
        raise ModelError(f"MONAI bundle '{path}': building network_def from {config_file} failed: {exc}") from exc
    weights = checkpoint or os.path.join(path, "models", "model.pt")
    if os.path.isfile(weights):
        load_checkpoint(model, weights)
    elif checkpoint is None:
        logger.warning("MONAI bundle '%s' has no models/model.pt: its network keeps random weights", path)
        weights = None
    prepare_monai_model(model)
    network_def = parser["network_def"]
    target = str(network_def.get("_target_", "")) if isinstance(network_def, dict) else ""
    config = _bundle_data_config(parser, model, network_def if isinstance(network_def, dict) else {})
    pred = _meta(parser, "network_data_format", "outputs", "pred") or {}
    segmentation = pred.get("format") == "segmentation" or target.rsplit(".", 1)[-1] in SEGMENTATION_NETS
    preprocess = _bundle_preprocessing(parser, path)
    return LoadedModel(
        model=model,
        data_config=config,
        source="bundle",
        name=path,
        output=foreground_sum() if segmentation else "auto",
        layers=None,
        task="segmentation" if segmentation else "classification",
        num_classes=pred.get("num_channels") or network_def.get("out_channels") or network_def.get("num_classes"),
        checkpoint=weights,
        info={"config": config_file, "network": target, "preprocess": preprocess},
    )


def _meta(parser, *keys):
    node = parser.get("_meta_", {}) or {}
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _bundle_data_config(parser, model: nn.Module, network_def: Dict[str, Any]) -> DataConfig:
    image = _meta(parser, "network_data_format", "inputs", "image") or {}
    base = monai_data_config(model, {k: v for k, v in network_def.items() if not str(k).startswith("_")})
    shape = image.get("spatial_shape")
    size = None
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(s, int) for s in shape):
        size = tuple(shape)  # "16*n"-style shapes are constraints, not sizes: keep the files' own
    dims = len(shape) if isinstance(shape, (list, tuple)) and shape else base.spatial_dims
    return DataConfig(
        channels=int(image.get("num_channels", base.channels)),
        spatial_dims=dims,
        spatial_size=size,
        intensity="scale",
        interpolation="trilinear" if dims == 3 else "bilinear",
    )


def _bundle_preprocessing(parser, path: str):
    """The bundle's own ``preprocessing`` (a dict transform on ``{"image": file}``), or None."""
    if "preprocessing" not in parser.config:
        return None
    try:
        return parser.get_parsed_content("preprocessing", instantiate=True)
    except Exception as exc:  # it may refer to items only its workflow defines
        logger.warning("MONAI bundle '%s': its preprocessing cannot be built (%s); using the default transforms",
                       path, exc)
        return None
