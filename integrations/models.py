"""``load_model(spec)``: one entry point for every model source.

=================================  ==================================================
spec                               what is built
=================================  ==================================================
``timm:NAME``                      ``timm.create_model(NAME, pretrained=False)``
``torchvision:NAME``               ``torchvision.models.get_model(NAME, weights=None)``
``monai:NAME``                     ``monai.networks.nets.NAME(**model_kwargs)``
``PATH`` or ``bundle:PATH``        a local MONAI bundle folder (``configs/``, ``models/model.pt``)
``package.module:function``        ``function(**model_kwargs)`` returning an ``nn.Module``
=================================  ==================================================

Weights are random unless ``checkpoint`` names a local file (read with
``torch.load(weights_only=True)``); nothing is ever downloaded.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import re
import sys
from typing import Any, Dict, Optional, Union

import torch.nn as nn

from nnsim_hooks.errors import DataError, InputError, ModelError

from .checkpoints import load_checkpoint
from .config import DataConfig, LoadedModel

logger = logging.getLogger(__name__)

SOURCES = ("timm", "torchvision", "monai", "bundle")

ModelKwargs = Union[None, str, Dict[str, Any]]


def parse_model_kwargs(model_kwargs: ModelKwargs) -> Dict[str, Any]:
    """A dict from a dict, a JSON string (``--model-kwargs``) or None."""
    if model_kwargs is None or model_kwargs == "":
        return {}
    if isinstance(model_kwargs, dict):
        return dict(model_kwargs)
    if isinstance(model_kwargs, str):
        try:
            parsed = json.loads(model_kwargs)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"model_kwargs is not valid JSON ({exc.msg} at character {exc.pos}): {model_kwargs!r}. "
                "Example: --model-kwargs '{\"spatial_dims\": 3, \"in_channels\": 1, \"out_channels\": 2}'"
            ) from exc
        if not isinstance(parsed, dict):
            raise InputError(f"model_kwargs must be a JSON object {{...}}, got {type(parsed).__name__}")
        return parsed
    raise InputError(f"model_kwargs must be a dict or a JSON string, got {type(model_kwargs).__name__}")


def load_model(
    spec: Union[str, nn.Module],
    *,
    model_kwargs: ModelKwargs = None,
    checkpoint: Optional[str] = None,
    num_classes: Optional[int] = None,
) -> LoadedModel:
    """Build the model named by ``spec`` (see the module docstring), in eval mode.

    Args:
        spec: ``timm:NAME``, ``torchvision:NAME``, ``monai:NAME``, a MONAI bundle
            folder, ``package.module:function``, or an ``nn.Module`` to wrap as it is.
        model_kwargs: keyword arguments for the constructor (a dict or a JSON string).
        checkpoint: a local state_dict file to load (strictly; mismatched keys are named).
        num_classes: the number of classes (output channels for MONAI segmentation nets).

    Returns:
        a :class:`LoadedModel` with the model, its data config and suggested ``output=``.
    """
    kwargs = parse_model_kwargs(model_kwargs)
    if num_classes is not None and int(num_classes) < 1:
        raise InputError(f"num_classes must be at least 1, got {num_classes}")
    if isinstance(spec, nn.Module):
        return _wrap_module(spec, "module", type(spec).__name__, checkpoint)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"the model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    source, _, name = spec.partition(":")
    options = dict(model_kwargs=kwargs, checkpoint=checkpoint, num_classes=num_classes)
    if source == "timm":
        from .timm import load_timm

        return load_timm(_name(name, spec), **options)
    if source == "torchvision":
        from .torchvision import load_torchvision

        return load_torchvision(_name(name, spec), **options)
    if source == "monai":
        from .monai import load_monai

        return load_monai(_name(name, spec), **options)
    if source == "bundle" or os.path.isdir(spec):
        from .monai import is_bundle, load_bundle

        path = name if source == "bundle" else spec
        if not is_bundle(path):
            raise DataError(
                f"'{path}' is not a MONAI bundle: a bundle folder holds configs/inference.json (or train.json) "
                "and models/model.pt"
            )
        return load_bundle(path, **options)
    if ":" in spec:
        return _load_callable(source, name, spec, **options)
    raise InputError(
        f"cannot tell which model '{spec}' is: write timm:NAME, torchvision:NAME, monai:NAME, a MONAI bundle "
        "folder, or package.module:function"
        + (f" (did you mean timm:{spec} or torchvision:{spec}?)" if spec.replace("_", "").isalnum() else "")
    )


# package.module and function names of a ``package.module:function`` spec
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _name(name: str, spec: str) -> str:
    if not name:
        raise InputError(f"model spec '{spec}' names no model after the colon")
    return name


def _import(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Console scripts do not put the working directory on sys.path; users expect
        # their own module there to be found.
        if os.getcwd() not in sys.path and exc.name and module_name.startswith(exc.name):
            sys.path.insert(0, os.getcwd())
            try:
                return importlib.import_module(module_name)
            except ModuleNotFoundError:
                pass
            finally:
                sys.path.remove(os.getcwd())
        raise ModelError(
            f"model '{spec}': module '{module_name}' cannot be imported ({exc}); model sources are timm:NAME, "
            f"torchvision:NAME, monai:NAME, a bundle folder, or package.module:function"
        ) from exc


def _load_callable(module_name: str, attr: str, spec: str, *, model_kwargs, checkpoint, num_classes) -> LoadedModel:
    for part, what in ((module_name, "a module (package.module)"), (attr, "a function (name or Class.name)")):
        if not _DOTTED.match(part):
            raise InputError(f"model spec '{spec}': {part!r} is not {what}; write package.module:function, e.g. "
                             "mymodels:build_net, or timm:NAME, torchvision:NAME, monai:NAME")
    module = _import(module_name, spec)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            from .names import close_names

            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            close = close_names(part, public)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelError(f"model '{spec}': module '{module_name}' has no attribute '{attr}'{hint}")
        fn = getattr(fn, part)
    kwargs = dict(model_kwargs)
    if num_classes is not None:
        try:
            accepts = "num_classes" in inspect.signature(fn).parameters or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()
            )
        except (TypeError, ValueError):
            accepts = True
        if not accepts:
            raise ModelError(f"model '{spec}': {attr}() takes no num_classes argument; drop --num-classes")
        kwargs["num_classes"] = int(num_classes)
    try:
        result = fn(**kwargs) if callable(fn) else fn
    except TypeError as exc:
        raise ModelError(f"model '{spec}': calling {attr}(**{kwargs}) failed: {exc}") from exc
    if isinstance(result, LoadedModel):
        if checkpoint:
            load_checkpoint(result.model, checkpoint)
            result.checkpoint = checkpoint
        result.model.eval()
        return result
    if not isinstance(result, nn.Module):
        raise ModelError(f"model '{spec}': {attr}() returned a {type(result).__name__}, not a torch.nn.Module")
    return _wrap_module(result, "callable", spec, checkpoint, getattr(fn, "data_config", None))


def _wrap_module(model: nn.Module, source: str, name: str, checkpoint: Optional[str], config=None) -> LoadedModel:
    if checkpoint:
        load_checkpoint(model, checkpoint)
    model.eval()
    data_config = infer_data_config(model, config)
    return LoadedModel(model=model, data_config=data_config, source=source, name=name, output="auto",
                       layers=None, task="unknown", checkpoint=checkpoint)


def infer_data_config(model: nn.Module, config=None) -> DataConfig:
    """A data config for a model of unknown origin: ``config`` (a DataConfig or a dict
    of its fields) or the model's ``data_config`` attribute when given, timm's config
    for a timm model, else channels and dimensions from the first convolution."""
    config = config if config is not None else getattr(model, "data_config", None)
    if isinstance(config, DataConfig):
        return config
    if isinstance(config, dict):
        try:
            return DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        except TypeError as exc:
            raise ModelError(f"the model's data_config {config} has unknown fields: {exc}") from exc
    if getattr(model, "pretrained_cfg", None):
        try:
            from .timm import timm_data_config

            return timm_data_config(model)
        except ImportError:
            pass
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return DataConfig(channels=module.in_channels, spatial_dims=len(module.kernel_size),
                              intensity="normalize" if len(module.kernel_size) == 2 else "scale")
    return DataConfig()
