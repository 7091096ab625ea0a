"""The input size the user asks for (``--image-size``, ``--spatial-size``): small images
stay small when the model takes them.

A CNN with global pooling (timm's and torchvision's ResNets, MONAI's DenseNet...) takes
inputs of many sizes: the data are simply resized to the requested size (the whole
picture, no centre crop). A model whose input size is part of its architecture (a
ViT's grid of patches) is built again for that size when its constructor takes
``img_size`` (timm's ViTs, MONAI's transformers); its patches must then tile the size.
Either way one forward pass of zeros at that size checks that the model accepts it, and
a size it refuses is an :class:`~nnsim_hooks.errors.InputError` naming the size and the
smallest one the model accepts (found by trying sizes).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import replace
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from nnsim_hooks.errors import InputError, ModelError

from .config import LoadedModel

logger = logging.getLogger(__name__)

#: The largest side tried when looking for the smallest size a model accepts.
LARGEST_TRIED = 512
#: the same for volumes when checking the data's own size (a 512³ forward pass would not fit in memory)
LARGEST_3D = 128

Size = Union[int, Sequence[int]]


def parse_size(text: Union[str, Size], spatial_dims: int, flag: str) -> Tuple[int, ...]:
    """``(side, ...)`` with one entry per spatial axis, from ``64``, ``"64"``, ``"64,48"``
    or ``"32x32x16"`` (one number: the same on every axis)."""
    if isinstance(text, int) and not isinstance(text, bool):
        parts = [text]
    elif isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        words = str(text).replace("x", ",").replace("X", ",").split(",")
        try:
            parts = [int(w) for w in words]
        except ValueError:
            raise InputError(f"{flag} {text!r} is not a size: write one number (64) or one per axis "
                             f"({','.join(['64'] * spatial_dims)})") from None
    if len(parts) == 1:
        parts = parts * spatial_dims
    if len(parts) != spatial_dims:
        raise InputError(f"{flag} {text!r} gives {len(parts)} sides but the model takes {spatial_dims}-D inputs; "
                         f"give one number, or {spatial_dims}")
    bad = [p for p in parts if isinstance(p, bool) or not isinstance(p, int) or p < 1]
    if bad:
        raise InputError(f"{flag} {text!r}: sides must be positive integers, got {bad}")
    return tuple(int(p) for p in parts)


def _patch_size(model: nn.Module) -> Optional[Tuple[int, ...]]:
    """The patch size of a model that cuts its input into patches (timm's ``patch_embed``)."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None:
        return None
    return tuple(size) if isinstance(size, (list, tuple)) else (int(size),)


def _takes_img_size(model: nn.Module) -> bool:
    try:
        return "img_size" in inspect.signature(type(model).__init__).parameters
    except (TypeError, ValueError):
        return False


def accepts(model: nn.Module, channels: int, size: Tuple[int, ...]) -> Optional[str]:
    """None when ``model`` runs on one input of zeros ``[1, C, *size]``, else why not."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, channels, *size), device=device, dtype=dtype))
    except Exception as exc:  # noqa: BLE001 - any failure means "not this size"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        model.train(was_training)
    return None


def smallest_accepted(model: nn.Module, channels: int, spatial_dims: int, above: int,
                      largest: int = LARGEST_TRIED) -> Optional[int]:
    """The smallest side (the same on every axis) above ``above`` that ``model`` accepts,
    or None up to ``largest``: doubling, then bisecting (models refuse inputs that are
    too small, not too large)."""
    low, high = above, None
    side = max(1, above)
    while side < largest:
        side = min(2 * side, largest)
        if accepts(model, channels, (side,) * spatial_dims) is None:
            high = side
            break
        low = side
    if high is None:
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if accepts(model, channels, (middle,) * spatial_dims) is None:
            high = middle
        else:
            low = middle
    return high


def with_input_size(loaded: LoadedModel, size: Union[str, Size], flag: str = "input size") -> LoadedModel:
    """``loaded`` set up for inputs of ``size`` (see the module docstring): the model
    rebuilt for it when its architecture fixes the size, the data config resized to it
    (whole pictures: no centre crop). ``flag`` names the option in messages."""
    config = loaded.data_config
    if flag == "--image-size" and config.spatial_dims != 2:
        raise InputError(f"--image-size is for 2-D image models; {loaded.spec} takes {config.spatial_dims}-D inputs: "
                         f"use --spatial-size (e.g. --spatial-size {','.join(['64'] * config.spatial_dims)})")
    sides = parse_size(size, config.spatial_dims, flag)
    if loaded.info.get("preprocess") is not None:
        raise InputError(f"{flag}: {loaded.spec} reads its data with the bundle's own preprocessing, which sets the "
                         "size; change it in the bundle's configs instead")
    model = loaded.model
    patch = _patch_size(model)
    if patch is not None:
        patch = patch * config.spatial_dims if len(patch) == 1 else patch
        if any(s % p for s, p in zip(sides, patch)):
            smallest = "x".join(str(p) for p in patch)
            raise InputError(f"{flag} {'x'.join(map(str, sides))}: {loaded.spec} cuts its input into "
                             f"{smallest}-pixel patches; give a multiple of the patch size, at least {smallest}")
    if _takes_img_size(model) and loaded.source == "timm":
        from .timm import load_timm

        kwargs = dict(loaded.info.get("model_kwargs") or {}, img_size=list(sides))
        loaded = load_timm(loaded.name, model_kwargs=kwargs, checkpoint=loaded.checkpoint,
                           num_classes=loaded.num_classes)
        model = loaded.model
    elif _takes_img_size(model):
        current = config.spatial_size
        if current is not None and tuple(current) != sides:
            raise ModelError(f"{flag} {'x'.join(map(str, sides))}: {loaded.spec} was built for inputs of "
                             f"{'x'.join(map(str, current))}; build it for this size (model_kwargs img_size)")
    why = accepts(model, config.channels, sides)
    if why is not None:
        shown = "x".join(map(str, sides))
        smallest = smallest_accepted(model, config.channels, config.spatial_dims, max(sides))
        own = config.spatial_size
        if smallest is None and own is not None and accepts(model, config.channels, tuple(own)) is None:
            own_shown = "x".join(map(str, own))
            raise InputError(f"{flag} {shown}: {loaded.spec} takes only inputs of {own_shown}, the size it was built "
                             f"for ({why}); drop {flag}, or build the model for this size (--model-kwargs)")
        if smallest is None:
            raise InputError(f"{loaded.spec} refuses inputs of {shown} ({why}), and every size up to "
                             f"{LARGEST_TRIED}; check the model and its --model-kwargs")
        raise InputError(f"{flag} {shown} is smaller than {loaded.spec} accepts ({why}); the smallest it accepts "
                         f"is {'x'.join([str(smallest)] * config.spatial_dims)}: give {flag} {smallest} or more")
    data_config = replace(config.with_size(sides), crop_pct=1.0)
    if data_config.extra:
        data_config = replace(data_config, extra=dict(data_config.extra, input_size=(config.channels, *sides),
                                                      crop_pct=1.0))
    logger.info("inputs resized to %s for %s", "x".join(map(str, sides)), loaded.spec)
    return replace(loaded, data_config=data_config)


def check_data_size(loaded: LoadedModel, shape: Sequence[int]) -> None:
    """Samples of ``shape`` (``[C, *spatial]``, read at their own size) that ``loaded``'s
    model refuses because they are too small (a 3-D DenseNet121 needs about 32³): an
    InputError naming the smallest size it accepts and the flag that resizes the data to
    it. Nothing when the model takes them, or when no larger size helps either (then it
    is not a size problem, and the audit's own checks explain it)."""
    channels, sides = int(shape[0]), tuple(int(s) for s in shape[1:])
    why = accepts(loaded.model, channels, sides)
    if why is None:
        return
    # a bounded search: a 3-D network at 512³ would not fit in memory, and a model that
    # refuses much larger inputs too has another problem, explained by the audit's own checks
    largest = min(LARGEST_TRIED if len(sides) < 3 else LARGEST_3D, max(64, 4 * max(sides)))
    smallest = smallest_accepted(loaded.model, channels, len(sides), max(sides), largest)
    if smallest is None:
        return
    flag = "--image-size" if len(sides) == 2 else "--spatial-size"
    raise InputError(f"the samples are {'x'.join(map(str, sides))}, smaller than {loaded.spec} accepts ({why}); the "
                     f"smallest it accepts is {'x'.join([str(smallest)] * len(sides))}: give {flag} {smallest} "
                     f"(or more) to resize them")
