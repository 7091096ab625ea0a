"""Convolutions and transposed convolutions, 1-D to 3-D.

The per-sample weight gradient of a convolution is ``sum_u delta_u a_u^T`` over output
positions u, with ``a_u`` the input patch. Padding modes other than zeros and
``padding='same'`` are handled by padding the input exactly as the layer does. Grouped
convolutions are computed group by group, never as full cross-group products.

For the sketch, ``S_col a_u`` over all positions is itself a convolution of the input
with ``k`` filters (the rows of ``S_col``), so no patch matrix is formed.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Grads, LayerRule, trains
from .factored import mix
from .registry import register_rule

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def pad_like_layer(x: torch.Tensor, conv: nn.Module) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """The input padded the way ``conv`` pads it, and the padding still to apply.

    Zero padding that is symmetric is left to the convolution itself (returned as the
    second value); any other padding (reflect, replicate, circular, or the asymmetric
    zero padding of ``padding='same'``) is applied here, leaving nothing.
    """
    n = x.dim() - 2
    if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return x, tuple(conv.padding)
    pads = conv._reversed_padding_repeated_twice
    if conv.padding_mode == "zeros":
        x = F.pad(x, pads)
    else:
        x = F.pad(x, pads, mode=conv.padding_mode)
    return x, (0,) * n


def unfold_nd(
    x: torch.Tensor, kernel: Tuple[int, ...], stride: Tuple[int, ...], dilation: Tuple[int, ...], padding: Tuple[int, ...]
) -> torch.Tensor:
    """Patches of ``x`` ``[B, C, *S]`` -> ``[B, C * prod(kernel), L]`` (im2col, any dimension)."""
    n = len(kernel)
    if n == 2:  # the same numbers; its backward (col2im) is about twice as fast as Tensor.unfold's
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    for i in range(n):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    # [B, C, *L, *k] -> [B, C, *k, *L]
    b, c = x.shape[:2]
    perm = [0, 1] + [2 + n + i for i in range(n)] + [2 + i for i in range(n)]
    x = x.permute(perm)
    return x.reshape(b, c * math.prod(kernel), -1)


def _ndim(module: nn.Module) -> int:
    return len(module.kernel_size)


class _ConvBase(LayerRule):
    differentiable = True

    def _patches(self, module, x: torch.Tensor) -> torch.Tensor:
        x, padding = pad_like_layer(x, module)
        return unfold_nd(x, module.kernel_size, module.stride, module.dilation, padding)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(_ConvBase):
    name = "conv"

    def _factors(self, module, activation, backprops):
        """cols ``[B, G, c_g, L]`` (patches) and rows ``[d, B, G, r_g, L]`` (output grads)."""
        groups = module.groups
        x = activation.to(backprops.dtype)
        cols = self._patches(module, x)
        b, _, length = cols.shape
        cols = cols.reshape(b, groups, -1, length)
        d = backprops.shape[0]
        rows = backprops.reshape(d, b, groups, -1, length)
        return cols, rows

    def grad_sample(self, module, activation, backprops) -> Grads:
        out: Grads = {}
        d, b = backprops.shape[:2]
        if module.weight.requires_grad:
            cols, rows = self._factors(module, activation, backprops)
            g = torch.einsum("jbgrl,bgcl->bjgrc", rows, cols)
            out["weight"] = g.reshape(b, d, *module.weight.shape)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = backprops.reshape(d, b, backprops.shape[2], -1).sum(-1).transpose(0, 1)
        return out

    def factors(self, module, activation, backprops):
        """Patches ``[B, c, L]`` and output gradients ``[d, B, r, L]``; None for grouped
        convolutions (their gradients are small per group: materialised)."""
        if module.groups > 1:
            return None
        cols, rows = self._factors(module, activation, backprops)
        return cols[:, 0], rows[:, :, 0]

    def sums(self, module, activation, backprops, weights) -> Grads:
        """The weight gradient of a backward whose output gradients were mixed by ``weights``:
        one convolution weight-gradient per k, no patches (any groups, any padding mode)."""
        n = _ndim(module)
        x, padding = pad_like_layer(activation.to(backprops.dtype), module)
        r = mix(backprops, weights)  # [K, B, out, *L]
        out: Grads = {}
        if trains(module, "weight"):
            out["weight"] = torch.stack([
                _CONV_WEIGHT[n](x, module.weight.shape, rk, module.stride, padding, module.dilation, module.groups)
                for rk in r
            ])
        if trains(module, "bias"):
            out["bias"] = r.reshape(r.shape[0], r.shape[1], r.shape[2], -1).sum((1, 3))
        return out

    def dots(self, module, activation, backprops, sums):
        """The layer's own forward with the weights ``S_k``, dotted with each output gradient."""
        x, padding = pad_like_layer(activation.to(backprops.dtype), module)
        d, b, c = backprops.shape[:3]
        k = next(iter(sums.values())).shape[0]
        conv = _CONV_FN[_ndim(module)]
        ys = []
        for j in range(k):
            w = sums["weight"][j].to(x.dtype) if "weight" in sums else None
            bias = sums["bias"][j].to(x.dtype) if "bias" in sums else None
            if w is None:  # bias only: the product is delta summed over positions, dotted with S_b
                ys.append(bias.view(1, c, 1).expand(b, c, backprops[0, 0, 0].numel()))
                continue
            ys.append(conv(x, w, bias, module.stride, padding, module.dilation, module.groups).reshape(b, c, -1))
        y = torch.stack(ys)  # [K, B, out, L]
        return torch.einsum("mbcl,kbcl->bmk", backprops.reshape(d, b, c, -1), y)

    def sketch(self, module, activation, backprops, sketches) -> Grads:
        if module.groups > 1:
            # Per-group weights are small (depthwise: k^n per channel): materialise them.
            return super().sketch(module, activation, backprops, sketches)
        out: Grads = {}
        d, b = backprops.shape[:2]
        if module.weight.requires_grad:
            s = sketches["weight"]
            rows = backprops.reshape(d, b, backprops.shape[2], -1)
            x = activation.to(backprops.dtype)
            if s.col_matrix is None:
                cols = self._patches(module, x)
            else:
                x, padding = pad_like_layer(x, module)
                filters = s.col_matrix.reshape(-1, *module.weight.shape[1:])
                conv = _CONV_FN[_ndim(module)]
                cols = conv(x, filters, None, module.stride, padding, module.dilation).reshape(b, filters.shape[0], -1)
            out["weight"] = s.combine_factors(s.rows_of(rows, 2), cols.unsqueeze(0))
        if module.bias is not None and module.bias.requires_grad:
            bias_grad = backprops.reshape(d, b, backprops.shape[2], -1).sum(-1).transpose(0, 1)
            out["bias"] = sketches["bias"].project_gradients(bias_grad)
        return out


def input_positions(cols: torch.Tensor, module: nn.Module, out_size, in_size) -> torch.Tensor:
    """``cols`` ``[N, C, L]``, the positions of a convolution (stride, dilation, padding of
    ``module``) of a transposed convolution's output gradient ``[N, *, *out_size]``, cut
    to the ``in_size`` positions of its input.

    They are the same positions unless ``output_padding >= stride`` (legal when
    ``dilation > stride``): the output then ends with rows no input position reaches,
    which give ``output_padding // stride`` positions more along that dimension.
    """
    grid = [
        (size + 2 * p - dil * (k - 1) - 1) // st + 1
        for size, p, dil, k, st in zip(out_size, module.padding, module.dilation, module.kernel_size, module.stride)
    ]
    if list(grid) == list(in_size):
        return cols
    cut = cols.reshape(*cols.shape[:2], *grid)[(..., *(slice(0, n) for n in in_size))]
    return cut.reshape(*cols.shape[:2], -1)


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeRule(_ConvBase):
    """``conv_transpose(a, W)`` is the adjoint of ``conv(., W)``, so
    ``<conv_transpose(a, W), delta> = <a, conv(delta, W)>``: the weight gradient is a
    convolution's weight gradient with the input ``delta`` and the output gradient ``a``."""

    name = "conv_transpose"

    def _delta_patches(self, module, backprops: torch.Tensor, positions) -> torch.Tensor:
        d, b = backprops.shape[:2]
        flat = backprops.reshape(d * b, *backprops.shape[2:])
        patches = unfold_nd(flat, module.kernel_size, module.stride, module.dilation, tuple(module.padding))
        patches = input_positions(patches, module, flat.shape[2:], positions)
        return patches.reshape(d, b, module.groups, -1, patches.shape[-1])  # [d, B, G, c_g, L]

    def _check_padding(self, module):
        if module.padding_mode != "zeros":  # pragma: no cover - PyTorch itself refuses this
            raise ValueError("ConvTranspose supports only zero padding")

    def grad_sample(self, module, activation, backprops) -> Grads:
        self._check_padding(module)
        out: Grads = {}
        d, b = backprops.shape[:2]
        if module.weight.requires_grad:
            patches = self._delta_patches(module, backprops, activation.shape[2:])
            a = activation.to(backprops.dtype).reshape(b, module.groups, -1, patches.shape[-1])
            g = torch.einsum("bgrl,jbgcl->bjgrc", a, patches)
            out["weight"] = g.reshape(b, d, *module.weight.shape)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = backprops.reshape(d, b, backprops.shape[2], -1).sum(-1).transpose(0, 1)
        return out

    def sketch(self, module, activation, backprops, sketches) -> Grads:
        self._check_padding(module)
        if module.groups > 1:
            return super().sketch(module, activation, backprops, sketches)
        out: Grads = {}
        d, b = backprops.shape[:2]
        if module.weight.requires_grad:
            s = sketches["weight"]
            a = activation.to(backprops.dtype).reshape(b, module.in_channels, -1)  # [B, C_in, L]
            flat = backprops.reshape(d * b, *backprops.shape[2:])
            if s.col_matrix is None:
                cols = unfold_nd(flat, module.kernel_size, module.stride, module.dilation, tuple(module.padding))
            else:
                filters = s.col_matrix.reshape(-1, *module.weight.shape[1:])
                conv = _CONV_FN[_ndim(module)]
                cols = conv(flat, filters, None, module.stride, module.padding, module.dilation).flatten(2)
            cols = input_positions(cols, module, flat.shape[2:], activation.shape[2:])
            cols = cols.reshape(d, b, cols.shape[1], -1)  # [d, B, R*k_c, L]
            out["weight"] = s.combine_factors(s.rows_of(a, 1).unsqueeze(0), cols)
        if module.bias is not None and module.bias.requires_grad:
            bias_grad = backprops.reshape(d, b, backprops.shape[2], -1).sum(-1).transpose(0, 1)
            out["bias"] = sketches["bias"].project_gradients(bias_grad)
        return out
