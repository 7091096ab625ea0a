"""Weighted sums of per-sample gradients, and each sample's inner product with them.

The exact dataset-scale queries (:mod:`nnsim_hooks.exact.dataset_kernel`) need, for K mixing
weights ``W [B, d, K]`` (d differentiated outputs per sample),

- the accumulators ``S_k = sum_j sum_m W[j, m, k] g_{j,m}`` (one per k, the shape of each
  parameter): for a layer whose gradient is ``sum_u delta_u a_u^T`` this is just the weight
  gradient of a backward whose output gradients were mixed by W, one matmul (a
  convolution's weight gradient), never a per-sample gradient;
- the products ``P[i, m, k] = g_{i,m} . S_k``: for such a layer ``sum_u delta_{i,u} .
  (S_k a_{i,u})``, the layer's own forward run with the weight S_k (a "ghost" product).

Each rule gives both (:meth:`~nnsim_hooks.rules.base.LayerRule.sums` and
:meth:`~nnsim_hooks.rules.base.LayerRule.dots`): Linear, convolutions, Embedding and
attention in the factored forms above; the other rules, and generic-rule modules,
from their materialised per-sample gradients, one module at a time. This module keeps
the materialised forms and the mixing helper.
"""

from __future__ import annotations

from ..rules.base import Grads, dots_of_grads, sums_of_grads  # noqa: F401 - part of this module's API
from ..rules.factored import mix, per_sample_dots  # noqa: F401 - part of this module's API
