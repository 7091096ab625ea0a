"""timm: models by name, timm's data config, and layer selection from timm's metadata.

Importing this module registers fast rules for timm's harmless layer subclasses (see
:mod:`nnsim_hooks.integrations.timm_rules`); without them those layers still work,
through the slower torch.func fallback.

    >>> from nnsim_hooks.integrations.timm import load_timm, timm_layers
    >>> loaded = load_timm("resnet18", num_classes=10)
    >>> layers = timm_layers(loaded.model, blocks=2)      # the last 2 blocks + the head
    >>> handle = nnsim_hooks.attach(loaded.model, layers=layers)
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch.nn as nn

from nnsim_hooks.errors import ModelError

from nnsim_hooks.optional import require
from .checkpoints import load_checkpoint
from .config import DataConfig, LoadedModel
from .names import unknown_name_message
from .timm_rules import register_timm_rules

logger = logging.getLogger(__name__)


def _timm():
    return require("timm", "timm models (timm:NAME)")


def load_timm(
    name: str,
    *,
    model_kwargs: Optional[Dict[str, Any]] = None,
    checkpoint: Optional[str] = None,
    num_classes: Optional[int] = None,
) -> LoadedModel:
    """Create timm model ``name`` with random weights (``pretrained=False``: nothing is
    downloaded), load ``checkpoint`` if given, and return it in eval mode with timm's
    data config."""
    timm = _timm()
    register_timm_rules()
    if not timm.is_model(name):
        raise ModelError(
            unknown_name_message(
                "timm", name, timm.list_models(), "list them with python -c \"import timm; print(timm.list_models('*NAME*'))\""
            )
        )
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    kwargs.pop("pretrained", None)  # never download; weights come from a local checkpoint
    if "checkpoint_path" in kwargs:
        raise ModelError("pass the weights as checkpoint= (--checkpoint), which reads them with "
                         "torch.load(weights_only=True), not as timm's checkpoint_path model kwarg")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise ModelError(f"timm model '{name}' does not accept model_kwargs {kwargs}: {exc}") from exc
    if checkpoint:
        load_checkpoint(model, checkpoint)
    prepare_timm_model(model)
    config = timm_data_config(model, kwargs)
    classes = getattr(model, "num_classes", None)
    return LoadedModel(
        model=model,
        data_config=config,
        source="timm",
        name=name,
        output="auto" if classes else "sum",
        layers=None,
        task="classification" if classes else "features",
        num_classes=classes or None,
        checkpoint=checkpoint,
        info={"classifier": _classifier_names(model), "model_kwargs": kwargs},
    )


class _NoCache(dict):
    """A stand-in for timm's ``attention_bias_cache`` that keeps nothing between calls:
    ``key in cache`` is always False and an item set is handed back once."""

    def __contains__(self, key) -> bool:
        return False

    def __getitem__(self, key):
        return dict.pop(self, key)


def prepare_timm_model(model: nn.Module) -> nn.Module:
    """Eval mode, timm's eval-mode attention-bias caches switched off, and the explicit
    attention path where the fused one hides a parameterised module from the hooks.

    LeViT, EfficientFormer (v1, v2), EfficientViT (MSRA) and TinyViT cache
    ``attention_biases[:, idxs]`` on the first eval-mode forward. With gradients on,
    that cached tensor carries the first call's graph: later calls back-propagate into
    a freed graph (an error) or into the first batch's graph (wrong gradients for the
    bias tables). Gradients need the bias recomputed on every call, which this does.

    MaxViT/CoAtNet and the relative-position ViTs read their ``rel_pos`` bias with
    ``rel_pos.get_bias()`` when attention is fused (``F.scaled_dot_product_attention``),
    so the ``rel_pos`` module's forward never runs and its parameters would get no
    per-sample gradient; their explicit path (the same maths) calls ``rel_pos(attn)``.

    Call it on timm models you create yourself; :func:`load_timm` does.
    """
    caches = unfused = 0
    for module in model.modules():
        if isinstance(getattr(module, "attention_bias_cache", None), dict) and not isinstance(
            module.attention_bias_cache, _NoCache
        ):
            module.attention_bias_cache = _NoCache()
            caches += 1
        rel_pos = getattr(module, "rel_pos", None)
        if getattr(module, "fused_attn", False) and isinstance(rel_pos, nn.Module) and any(
            True for _ in rel_pos.parameters()
        ):
            # The fused path reads the bias with rel_pos.get_bias(), which bypasses the
            # rel_pos module's forward and so its hooks; the explicit path calls it.
            module.fused_attn = False
            unfused += 1
    if caches or unfused:
        logger.debug("switched off %d attention-bias caches and %d fused attentions", caches, unfused)
    return model.eval()


def timm_data_config(model: nn.Module, model_kwargs: Optional[Dict[str, Any]] = None) -> DataConfig:
    """timm's resolved data config (input size, mean/std, interpolation, crop) as a
    :class:`DataConfig`. An ``img_size`` given in ``model_kwargs`` overrides the default
    input size, since timm keeps the pretrained config's size on the model."""
    _timm()
    from timm.data import resolve_model_data_config

    resolved = resolve_model_data_config(model)
    channels, *spatial = resolved["input_size"]
    img_size = (model_kwargs or {}).get("img_size")
    if img_size is not None:
        spatial = [img_size, img_size] if isinstance(img_size, int) else list(img_size)
    in_chans = (model_kwargs or {}).get("in_chans")
    if in_chans is not None:
        channels = int(in_chans)
    mean, std = tuple(resolved["mean"]), tuple(resolved["std"])
    if len(mean) != channels:  # timm keeps RGB statistics when in_chans changes
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    resolved = dict(resolved, input_size=(channels, *spatial), mean=mean, std=std)
    return DataConfig(
        channels=channels,
        spatial_dims=2,
        spatial_size=tuple(int(s) for s in spatial),
        mean=mean,
        std=std,
        intensity="normalize",
        interpolation=resolved.get("interpolation", "bicubic"),
        crop_pct=float(resolved.get("crop_pct", 1.0)),
        extra=resolved,
    )


def timm_transform(config: DataConfig):
    """timm's own evaluation transform for ``config`` (PIL image -> normalised tensor)."""
    _timm()
    from timm.data import create_transform

    extra = dict(config.extra)
    extra.update(input_size=config.input_size, mean=config.mean, std=config.std, crop_pct=config.crop_pct,
                 interpolation=config.interpolation)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: extra[k] for k in keys if k in extra}, is_training=False)


# -- layer selection from timm's metadata ------------------------------------------------


def _classifier_names(model: nn.Module) -> List[str]:
    """Module names of the classifier head(s) from ``pretrained_cfg['classifier']``."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    classifier = cfg.get("classifier")
    if not classifier:
        return []
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    modules = dict(model.named_modules())
    # num_classes=0 turns the head into an Identity: keep the heads that hold parameters.
    return [n for n in names if n in modules and any(True for _ in modules[n].parameters())]


def _owner(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def timm_layers(model: nn.Module, *, blocks: int = 0, head: bool = True) -> List[str]:
    """A ``layers=`` value for :func:`nnsim_hooks.attach` from timm's own metadata.

    Args:
        model: a timm model (it has ``group_matcher`` and ``pretrained_cfg``).
        blocks: how many of the last blocks to include, as timm groups them
            (``model.group_matcher(coarse=False)``, the grouping timm uses for
            layer-wise learning-rate decay). The final norm timm attaches to the last
            block group comes with it.
        head: include the classifier, ``pretrained_cfg['classifier']`` (and the other
            parameters timm leaves outside every block group: head norms, pooling).

    Returns:
        the names of the modules that own the selected parameters (sorted in model order).
    """
    if blocks < 0:
        raise ValueError(f"blocks must be >= 0, got {blocks}")
    if not blocks and not head:
        raise ValueError("select something: blocks >= 1 or head=True")
    names: List[str] = []
    classifier = _classifier_names(model)
    in_head = lambda n: any(n == c or n.startswith(c + ".") for c in classifier)  # noqa: E731
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    if head:
        if not classifier:
            raise ModelError(
                f"{type(model).__name__} has no classifier named in pretrained_cfg['classifier'] "
                "(num_classes=0?); select blocks only (head=False)"
            )
    groups = _block_groups(model, params)
    head_group = groups[-1] if groups and any(in_head(n) for n in groups[-1]) else []
    body = [g for g in groups if g is not head_group]
    # Group 0 is timm's stem; it is a block only for models with nothing else.
    candidates = body[1:] if len(body) > 1 else body
    if blocks > len(candidates):
        raise ModelError(
            f"{type(model).__name__} has {len(candidates)} block groups (timm's group_matcher); "
            f"blocks={blocks} asks for more"
        )
    selected = [n for g in (candidates[len(candidates) - blocks:] if blocks else []) for n in g]
    if head:
        selected += [n for n in params if in_head(n)] + [n for n in head_group if not in_head(n)]
    chosen = set(selected)
    for n in params:
        owner = _owner(n)
        if n in chosen and owner not in names:
            names.append(owner)
    return names


def _block_groups(model: nn.Module, params: Sequence[str]) -> List[List[str]]:
    """Parameter names grouped by ``group_matcher(coarse=False)``, in timm's order; the
    last group holds what no pattern matched (the head, for most models)."""
    matcher_fn = getattr(model, "group_matcher", None)
    if matcher_fn is None:
        raise ModelError(f"{type(model).__name__} has no group_matcher(); pass layers= module names instead")
    from timm.models._manipulate import group_parameters

    grouping = group_parameters(model, matcher_fn(coarse=False))
    wanted = set(params)
    return [[n for n in grouping[k] if n in wanted] for k in sorted(grouping) if any(n in wanted for n in grouping[k])]


# Importing the timm integration registers its rules (when timm is installed).
try:  # pragma: no branch
    register_timm_rules()
except ImportError:  # pragma: no cover - timm missing: load_timm will say so
    pass
