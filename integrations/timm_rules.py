"""Fast per-layer rules for timm's layer subclasses whose maths we have checked.

The core looks rules up by *exact* type, so timm's subclasses of ``nn.Linear``,
``nn.LayerNorm``, ``nn.GroupNorm`` or ``nn.BatchNorm2d`` go to the torch.func fallback
until they are registered here. Each registration below was checked against the
layer's ``forward`` in timm 1.0 (and is tested against the per-sample loop):

- ``Linear``: ``F.linear(x, weight, bias)``, nn.Linear's maths -> the core's rule.
- ``LayerNorm``: ``F.layer_norm`` over the last dims -> the core's rule. The ``*Fp32``
  variants of every norm below normalise in float32 and cast back; their rules do too.
- ``GroupNorm``, ``GroupNorm1``: ``F.group_norm`` -> a channels-first rule here
  (metaformer's ``GroupNorm1NoBias`` has no bias, which Opacus's rule assumes).
- ``LayerNorm2d``, ``LayerNorm2dFp32``, ``LayerNormExp2d``: layer norm over the
  *channel* dimension of NCHW tensors (they permute) -> a channels-first rule here.
- ``RmsNorm``/``RmsNorm2d``, ``SimpleNorm``/``SimpleNorm2d`` (and Fp32 variants):
  ``x_hat * weight`` with timm's own normalisation functions.
- ``LayerScale``, ``LayerScale2d`` (not in-place): ``x * gamma``.
- ``GlobalResponseNorm``: ``x + bias + weight * (x * x_n)``, x_n free of parameters.
- metaformer's ``Scale`` (``x * scale``), ``StarReLU`` (``scale * relu(x)**2 + bias``),
  ``*NoBias`` norms; hgnet's ``LearnableAffineBlock`` (``scale * x + bias``); mlp_mixer's ``Affine``
  (``beta + alpha * x``); fastvit's
  ``LayerScale2d``, swiftformer's ``LayerScale2d``.
- ``Conv2dSame``: TF "SAME" padding computed from the input size, then an unpadded
  ``F.conv2d`` -> the core's conv rule on the padded input.
- Norm + activation layers (``BatchNormAct2d``, ``GroupNormAct``, ``GroupNorm1Act``,
  ``LayerNormAct``, ``LayerNormAct2d``, ``RmsNormAct``, ``RmsNormAct2d`` and Fp32
  variants): these apply ``drop`` and ``act`` *inside* the module, so the output
  gradient the hook sees is taken after the activation. The rule recomputes the
  pre-activation output and pulls the gradient back through ``act`` (a vector-Jacobian
  product of an elementwise function) before forming the parameter gradients. A
  ``drop`` layer that is active (training mode) is refused: call ``model.eval()``.

Left on the fallback on purpose, because their ``forward`` changes the maths:
``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d``, ``ScaledStdConv2dSame``
(weight standardisation), ``Conv2dSameExport`` (caches the padding of the first
input size), ``CondConv2d``, ``EvoNorm*``, ``FilterResponseNorm*``, in-place
``LayerScale``, and model-level parameters (a ViT's ``cls_token``, ``pos_embed``).

Importing :mod:`nnsim_hooks.integrations.timm` registers these rules; so does
:func:`register_timm_rules` (idempotent), which :func:`~nnsim_hooks.integrations.load_model`
calls for ``timm:`` models.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnsim_hooks.errors import BatchCouplingError, ModelError
from nnsim_hooks.rules import RULES, LayerRule, add_rule
from nnsim_hooks.rules.base import Grads
from nnsim_hooks.rules.conv import ConvRule
from nnsim_hooks.rules.linear import LinearRule
from nnsim_hooks.rules.norm import LayerNormRule, batch_coupling_message, uses_batch_statistics

from nnsim_hooks.optional import require

logger = logging.getLogger(__name__)

# A term of an affine layer: the tensor that multiplies the parameter (None: the
# parameter is added, a bias) and the parameter's shape as broadcast against one
# sample (right-aligned, like PyTorch broadcasting).
Term = Tuple[Optional[torch.Tensor], Tuple[int, ...]]


def _channels_first(param: torch.Tensor, sample_dims: int) -> Tuple[int, ...]:
    """How a per-channel vector broadcasts over a channels-first sample ``[C, *S]``."""
    return (param.numel(),) + (1,) * (sample_dims - 1)


def sample_view(view: Sequence[int], sample_dims: int) -> Tuple[int, ...]:
    """``view`` right-aligned to ``sample_dims`` dimensions (leading 1s added or dropped:
    a ``[1, 1, C]`` parameter on ``[T, C]`` samples)."""
    view = tuple(view)
    while len(view) > sample_dims and view[0] == 1:
        view = view[1:]
    return (1,) * (sample_dims - len(view)) + view


def affine_grads(module: nn.Module, backprops: torch.Tensor, terms: Dict[str, Term]) -> Grads:
    """Per-sample gradients ``[B, d, *shape]`` for ``out = ... + sum_k view(p_k) * h_k``.

    ``backprops`` is ``[d, B, *sample]``; each gradient is ``delta * h`` summed down to
    the parameter's broadcast shape (``Tensor.sum_to_size``).
    """
    d, b = backprops.shape[:2]
    sample_dims = backprops.dim() - 2
    out: Grads = {}
    for name, (h, view) in terms.items():
        param = getattr(module, name)
        if param is None or not param.requires_grad:
            continue
        prod = backprops if h is None else backprops * h.to(backprops.dtype).unsqueeze(0)
        view = sample_view(view, sample_dims)
        grad = prod.sum_to_size(d, b, *view)
        out[name] = grad.reshape(d, b, *param.shape).transpose(0, 1)
    return out


class AffineRule(LayerRule):
    """Base of layers whose output is affine in their parameters: ``x_hat * w + b``
    with ``x_hat`` not depending on them. Subclasses give :meth:`normalized` and
    :meth:`layout`."""

    name = "timm_affine"
    weight_name = "weight"
    bias_name: Optional[str] = "bias"

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layout(self, module: nn.Module, param: torch.Tensor, sample_dims: int) -> Tuple[int, ...]:
        """Channels-last by default: the parameter broadcasts over the trailing dims."""
        return tuple(param.shape)

    def terms(self, module: nn.Module, x: torch.Tensor) -> Dict[str, Term]:
        x_hat = self.normalized(module, x)
        sample_dims = x_hat.dim() - 1
        out: Dict[str, Term] = {}
        weight = getattr(module, self.weight_name, None)
        if weight is not None:
            out[self.weight_name] = (x_hat, self.layout(module, weight, sample_dims))
        bias = getattr(module, self.bias_name, None) if self.bias_name else None
        if bias is not None:
            out[self.bias_name] = (None, self.layout(module, bias, sample_dims))
        return out

    def grad_sample(self, module, activation, backprops) -> Grads:
        x = activation.to(backprops.dtype)
        return affine_grads(module, backprops, self.terms(module, x))


class ChannelsFirstMixin:
    def layout(self, module, param, sample_dims):
        return _channels_first(param, sample_dims)


class LayerNorm2dRule(ChannelsFirstMixin, AffineRule):
    """timm's LayerNorm2d: ``F.layer_norm`` over C of NCHW, via a permute."""

    name = "timm_layernorm2d"

    def normalized(self, module, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), module.normalized_shape, None, None, module.eps).permute(0, 3, 1, 2)


class GroupNormAffineRule(ChannelsFirstMixin, AffineRule):
    """``F.group_norm`` with optional weight and bias (metaformer drops the bias)."""

    name = "timm_groupnorm"

    def normalized(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class RmsNormRule(AffineRule):
    name = "timm_rmsnorm"
    bias_name = None

    def normalized(self, module, x):
        from timm.layers import norm

        return norm.rms_norm(x, module.normalized_shape, None, module.eps)


class RmsNorm2dRule(ChannelsFirstMixin, AffineRule):
    name = "timm_rmsnorm2d"
    bias_name = None

    def normalized(self, module, x):
        from timm.layers.fast_norm import rms_norm2d

        return rms_norm2d(x, module.normalized_shape, None, module.eps)


class SimpleNormRule(AffineRule):
    name = "timm_simplenorm"
    bias_name = None

    def normalized(self, module, x):
        from timm.layers.fast_norm import simple_norm

        return simple_norm(x, module.normalized_shape, None, module.eps)


class SimpleNorm2dRule(ChannelsFirstMixin, AffineRule):
    name = "timm_simplenorm2d"
    bias_name = None

    def normalized(self, module, x):
        from timm.layers.fast_norm import simple_norm

        return simple_norm(x.permute(0, 2, 3, 1), module.normalized_shape, None, module.eps).permute(0, 3, 1, 2)


class LayerScaleRule(AffineRule):
    """``x * gamma`` (channels last); in-place LayerScale overwrites its own input, so
    it is not supported here."""

    name = "timm_layerscale"
    weight_name = "gamma"
    bias_name = None

    def supports(self, module):
        return not getattr(module, "inplace", False)

    def normalized(self, module, x):
        return x


class LayerScale2dRule(ChannelsFirstMixin, LayerScaleRule):
    name = "timm_layerscale2d"


class ScaleRule(AffineRule):
    """metaformer's ``Scale``: ``x * scale.view(module.shape)``."""

    name = "timm_scale"
    weight_name = "scale"
    bias_name = None

    def normalized(self, module, x):
        return x

    def layout(self, module, param, sample_dims):
        return tuple(module.shape)


class ScalarAffineRule(AffineRule):
    """hgnet's ``LearnableAffineBlock``: ``scale * x + bias`` with scalar parameters."""

    name = "timm_scalar_affine"
    weight_name = "scale"

    def normalized(self, module, x):
        return x


class MixerAffineRule(AffineRule):
    """mlp_mixer's ``Affine``: ``beta + alpha * x`` with parameters of shape [1, 1, C]."""

    name = "timm_mixer_affine"
    weight_name = "alpha"
    bias_name = "beta"

    def normalized(self, module, x):
        return x


class StarReLURule(AffineRule):
    """metaformer's ``StarReLU``: ``scale * relu(x)**2 + bias`` with scalar parameters.
    relu is recomputed out of place (the module's own may be in place)."""

    name = "timm_star_relu"
    weight_name = "scale"

    def normalized(self, module, x):
        return F.relu(x) ** 2


class GlobalResponseNormRule(AffineRule):
    """``x + bias + weight * (x * x_n)``; ``x_n`` depends on x only."""

    name = "timm_grn"

    def normalized(self, module, x):
        x_g = x.norm(p=2, dim=module.spatial_dim, keepdim=True)
        x_n = x_g / (x_g.mean(dim=module.channel_dim, keepdim=True) + module.eps)
        return x * x_n

    def layout(self, module, param, sample_dims):
        return tuple(param.numel() if s == -1 else 1 for s in module.wb_shape[1:])


class Conv2dSameRule(LayerRule):
    """timm's Conv2dSame: pad the input as ``pad_same`` does, then the plain conv rule
    (the layer's own ``padding`` is 0). Delegates to a private ConvRule so that the
    input is padded once, whichever of its paths calls which."""

    name = "timm_conv2d_same"

    def __init__(self):
        self._conv = ConvRule()

    def supports(self, module):
        return tuple(module.padding) == (0, 0) and module.padding_mode == "zeros"

    @staticmethod
    def _padded(module, activation):
        from timm.layers.padding import pad_same

        return pad_same(activation, module.weight.shape[-2:], module.stride, module.dilation)

    def grad_sample(self, module, activation, backprops):
        return self._conv.grad_sample(module, self._padded(module, activation), backprops)

    def gram(self, module, activation, backprops):
        return self._conv.gram(module, self._padded(module, activation), backprops)

    def sketch(self, module, activation, backprops, sketches):
        return self._conv.sketch(module, self._padded(module, activation), backprops, sketches)

    def factors(self, module, activation, backprops):
        return self._conv.factors(module, self._padded(module, activation), backprops)

    def self_gram(self, module, activation, backprops):
        return self._conv.self_gram(module, self._padded(module, activation), backprops)

    def sums(self, module, activation, backprops, weights):
        return self._conv.sums(module, self._padded(module, activation), backprops, weights)

    def dots(self, module, activation, backprops, sums):
        return self._conv.dots(module, self._padded(module, activation), backprops, sums)


# -- norm + activation ---------------------------------------------------------------


def check_drop(module: nn.Module, module_name: str) -> None:
    """Refuse a ``drop`` layer in training mode: it draws a new random mask per call."""
    drop = getattr(module, "drop", nn.Identity())
    if not isinstance(drop, nn.Identity) and drop.training:
        raise ModelError(
            f"module '{module_name}' ({type(module).__name__}) applies {type(drop).__name__} in training mode, "
            "which draws a random mask per call: call model.eval() before computing similarities"
        )


def through_activation(module: nn.Module, pre: torch.Tensor, backprops: torch.Tensor, module_name: str = "") -> torch.Tensor:
    """Pull output gradients ``[d, B, ...]`` back through ``module.drop`` and
    ``module.act`` to the pre-activation output ``pre``."""
    check_drop(module, module_name)
    act = getattr(module, "act", nn.Identity())
    if isinstance(act, nn.Identity):
        return backprops
    d = backprops.shape[0]
    with torch.enable_grad():
        leaf = pre.detach().requires_grad_(True)
        # clone(): an in-place activation (timm's default) must not write into the leaf.
        y = act(leaf.clone())
        rows = [
            torch.autograd.grad(y, leaf, backprops[j], retain_graph=j < d - 1)[0] for j in range(d)
        ]
    return torch.stack(rows)


class NormActRule(AffineRule):
    """A norm followed by ``drop`` and ``act`` inside one module: the gradient reaching
    the norm's parameters is the output gradient pulled back through the activation."""

    def check(self, module, module_name):
        check_drop(module, module_name)

    def pre_activation(self, module, x_hat, terms) -> torch.Tensor:
        out = x_hat
        sample_dims = x_hat.dim() - 1
        weight = getattr(module, self.weight_name, None)
        if weight is not None:
            view = sample_view(terms[self.weight_name][1], sample_dims)
            out = out * weight.detach().to(x_hat.dtype).reshape(1, *view)
        bias = getattr(module, self.bias_name, None) if self.bias_name else None
        if bias is not None:
            view = sample_view(terms[self.bias_name][1], sample_dims)
            out = out + bias.detach().to(x_hat.dtype).reshape(1, *view)
        return out

    def grad_sample(self, module, activation, backprops) -> Grads:
        x = activation.to(backprops.dtype)
        terms = self.terms(module, x)
        x_hat = next((h for h, _ in terms.values() if h is not None), None)
        if x_hat is None:  # no affine weight: the output is x_hat + bias; recompute x_hat
            x_hat = self.normalized(module, x)
        pre = self.pre_activation(module, x_hat, terms)
        return affine_grads(module, through_activation(module, pre, backprops), terms)


class BatchNormActRule(ChannelsFirstMixin, NormActRule):
    name = "timm_batchnorm_act"

    def check(self, module, module_name):
        if uses_batch_statistics(module):
            raise BatchCouplingError(batch_coupling_message(module_name, module))
        super().check(module, module_name)

    def normalized(self, module, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.to(x.dtype).view(shape)
        var = module.running_var.to(x.dtype).view(shape)
        return (x - mean) / torch.sqrt(var + module.eps)


class GroupNormActRule(ChannelsFirstMixin, NormActRule):
    name = "timm_groupnorm_act"

    def normalized(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class LayerNormActRule(NormActRule):
    name = "timm_layernorm_act"

    def normalized(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class LayerNormAct2dRule(ChannelsFirstMixin, NormActRule):
    name = "timm_layernorm2d_act"

    def normalized(self, module, x):
        return LayerNorm2dRule().normalized(module, x)


class RmsNormActRule(NormActRule):
    name = "timm_rmsnorm_act"
    bias_name = None

    def normalized(self, module, x):
        return RmsNormRule().normalized(module, x)


class RmsNormAct2dRule(ChannelsFirstMixin, NormActRule):
    name = "timm_rmsnorm2d_act"
    bias_name = None

    def normalized(self, module, x):
        return RmsNorm2dRule().normalized(module, x)


class LayerNormAffineRule(AffineRule):
    """``F.layer_norm`` over the trailing dims (used for the Fp32 variant; the float32
    LayerNorm itself goes to the core's rule)."""

    name = "timm_layernorm"

    def normalized(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


def fp32(rule_cls: type) -> type:
    """The same rule for timm's ``*Fp32`` variants, which normalise in float32 and cast
    back: the normalised input is computed the same way, so that float64 and float16
    models get the numbers their forward used."""

    def normalized(self, module, x):
        return rule_cls.normalized(self, module, x.float()).to(x.dtype)

    return type(rule_cls.__name__.replace("Rule", "Fp32Rule"), (rule_cls,),
                {"normalized": normalized, "name": rule_cls.name + "_fp32", "__doc__": fp32.__doc__})


# -- registration ----------------------------------------------------------------------

# (module path in timm, class names, rule class). A class missing from the installed
# timm version is skipped.
_TABLE: Sequence[Tuple[str, Iterable[str], type]] = (
    ("timm.layers.linear", ("Linear",), LinearRule),
    ("timm.layers.norm", ("LayerNorm",), LayerNormRule),
    ("timm.layers.norm", ("LayerNormFp32",), fp32(LayerNormAffineRule)),
    ("timm.layers.norm", ("GroupNorm", "GroupNorm1"), GroupNormAffineRule),
    ("timm.layers.norm", ("LayerNorm2d", "LayerNormExp2d"), LayerNorm2dRule),
    ("timm.layers.norm", ("LayerNorm2dFp32",), fp32(LayerNorm2dRule)),
    ("timm.layers.norm", ("RmsNorm",), RmsNormRule),
    ("timm.layers.norm", ("RmsNormFp32",), fp32(RmsNormRule)),
    ("timm.layers.norm", ("RmsNorm2d",), RmsNorm2dRule),
    ("timm.layers.norm", ("RmsNorm2dFp32",), fp32(RmsNorm2dRule)),
    ("timm.layers.norm", ("SimpleNorm",), SimpleNormRule),
    ("timm.layers.norm", ("SimpleNormFp32",), fp32(SimpleNormRule)),
    ("timm.layers.norm", ("SimpleNorm2d",), SimpleNorm2dRule),
    ("timm.layers.norm", ("SimpleNorm2dFp32",), fp32(SimpleNorm2dRule)),
    ("timm.layers.layer_scale", ("LayerScale",), LayerScaleRule),
    ("timm.layers.layer_scale", ("LayerScale2d",), LayerScale2dRule),
    ("timm.layers.grn", ("GlobalResponseNorm",), GlobalResponseNormRule),
    ("timm.layers.conv2d_same", ("Conv2dSame",), Conv2dSameRule),
    ("timm.layers.norm_act", ("BatchNormAct2d",), BatchNormActRule),
    ("timm.layers.norm_act", ("GroupNormAct", "GroupNorm1Act"), GroupNormActRule),
    ("timm.layers.norm_act", ("LayerNormAct",), LayerNormActRule),
    ("timm.layers.norm_act", ("LayerNormActFp32",), fp32(LayerNormActRule)),
    ("timm.layers.norm_act", ("LayerNormAct2d",), LayerNormAct2dRule),
    ("timm.layers.norm_act", ("LayerNormAct2dFp32",), fp32(LayerNormAct2dRule)),
    ("timm.layers.norm_act", ("RmsNormAct",), RmsNormActRule),
    ("timm.layers.norm_act", ("RmsNormActFp32",), fp32(RmsNormActRule)),
    ("timm.layers.norm_act", ("RmsNormAct2d",), RmsNormAct2dRule),
    ("timm.layers.norm_act", ("RmsNormAct2dFp32",), fp32(RmsNormAct2dRule)),
    # fastvit's and swiftformer's own LayerScale2d: ``x * gamma``, gamma of shape [C, 1, 1].
    ("timm.models.fastvit", ("LayerScale2d",), LayerScaleRule),
    ("timm.models.swiftformer", ("LayerScale2d",), LayerScaleRule),
    # metaformer's NoBias norms: the parent's forward with bias=None.
    ("timm.models.metaformer", ("LayerNormNoBias",), LayerNormRule),
    ("timm.models.metaformer", ("LayerNorm2dNoBias",), LayerNorm2dRule),
    ("timm.models.metaformer", ("GroupNorm1NoBias",), GroupNormAffineRule),
    ("timm.models.metaformer", ("Scale",), ScaleRule),
    ("timm.models.metaformer", ("StarReLU",), StarReLURule),
    ("timm.models.hgnet", ("LearnableAffineBlock",), ScalarAffineRule),
    ("timm.models.mlp_mixer", ("Affine",), MixerAffineRule),
)

_REGISTERED: Dict[type, LayerRule] = {}


def register_timm_rules() -> Dict[type, LayerRule]:
    """Register the rules above with the core (exact types); safe to call again.

    Returns the registered ``{type: rule}``.
    """
    if _REGISTERED:
        # The registry may have been reset since (the test suite restores it after each
        # test): put back whatever is missing instead of trusting the first call.
        for layer_type, rule in _REGISTERED.items():
            if RULES.get(layer_type) is not rule:
                add_rule(layer_type, rule)
        return dict(_REGISTERED)
    require("timm", "the timm integration")
    import importlib

    instances: Dict[type, LayerRule] = {}
    for module_path, names, rule_cls in _TABLE:
        try:
            module = importlib.import_module(module_path)
        except ImportError:  # pragma: no cover - depends on the timm version
            logger.debug("timm has no module %s; its rules are skipped", module_path)
            continue
        rule = instances.setdefault(rule_cls, rule_cls())
        for name in names:
            layer_type = getattr(module, name, None)
            if layer_type is None:
                logger.debug("timm has no %s.%s; skipped", module_path, name)
                continue
            add_rule(layer_type, rule)
            _REGISTERED[layer_type] = rule
    return dict(_REGISTERED)
