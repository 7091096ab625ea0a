"""The similarity of pairs of inputs as a differentiable training term (the paper section 4).

:meth:`Handle.pair_similarity` gives, for pairs ``(a_i, b_i)``, the cosine
``k_i = g(a_i).g(b_i) / (|g(a_i)| |g(b_i)|)`` (``Tr(K_C)/d`` for d outputs) as a tensor
that back-propagates into the parameters (double back-propagation), so that
``loss = task + lam * (1 - k).mean()`` trains the model to make the pairs similar.

One pass for all P pairs: the 2P inputs run through the model as one batch, with
forward hooks on the modules that have a fast rule keeping their input ``a`` and a
tensor hook on their output receiving ``delta`` during a ``create_graph`` backward, so
both stay in the graph. From them, per pair and per layer:

- Linear and ungrouped convolutions: the ghost inner products
  ``sum_{u,v} (a_u . a'_v)(delta_u . delta'_v)`` over token / output positions, or the
  per-sample weight gradients ``sum_u delta_u a_u^T`` when they are smaller (few
  positions make the ghost form cheaper, many the materialised one);
- the other built-in rules (norms, embeddings, ...): their per-sample gradients;
- everything else (parameters used outside a hooked call, such as a ViT's
  ``cls_token`` and ``pos_embed``, ``nn.MultiheadAttention``, modules without a
  differentiable rule): torch.func, a ``vjp`` of the whole model per sample under
  ``vmap``, with the cotangent ``d f / d outputs`` taken from the batched pass.

Once per batch size, the per-sample gradients of the fast layers are checked to add up
to the batch gradient of each parameter; a parameter that also has uses the hooks do
not see fails that check, and its module moves to the torch.func path.

What it does with training-mode layers:

- **Dropout**: the 2P inputs go through the model once, in whatever mode the model is
  in, so each input gets one dropout mask, drawn as for ``model(torch.cat([a, b]))``,
  and its gradient is the gradient of that masked network (the one the task loss of
  that forward would see). Parameters on the torch.func path are re-run one sample at a
  time with masks of their own (``randomness="different"``).
- **BatchNorm with batch statistics** mixes the samples: per-sample gradients are not
  defined, and a :class:`~nnsim_hooks.errors.BatchCouplingError` says so. Either use
  GroupNorm / LayerNorm, or compute the term with BatchNorm on its running statistics:
  ``with nnsim_hooks.training.batchnorm_running_stats(model): k = h.pair_similarity(a, b)``.
- **Fused attention** (``scaled_dot_product_attention``) has no double backward on
  CPU: the term runs with the math kernel (``sdpa_kernel(SDPBackend.MATH)``).

A pair where one gradient is zero (or, for d outputs, ``K(x, x)`` is singular) has no
cosine: its k is 0, with no gradient through it, and a warning names the pairs.
Under ``torch.no_grad()`` the values are computed without a graph (not differentiable).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..data import batching
from ..capture.hooks import copies_to_hook
from ..errors import BatchCouplingError, InputError, ModelError, NonFiniteGradientError
from ..exact.kernels import SINGULAR_RTOL
from ..engine.outputs import OutputSpec, batched_outputs
from ..rules.conv import ConvRule
from ..rules.linear import LinearRule, _tokens
from ..rules.norm import batch_coupling_message, uses_batch_statistics
from ..capture.targets import Target
from ..model_device import model_device_dtype
from ..validation import batch_size_of, call_model, check_inputs, check_targets

logger = logging.getLogger(__name__)

Blocks = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # K(a,a), K(b,b), K(a,b): [P, d, d] each


def _math_attention():
    """The math kernel for scaled_dot_product_attention (the fused ones have no double backward)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _differentiable(target: Target) -> bool:
    """Built-in rules are plain torch maths on (activation, delta), so they keep the graph;
    rules registered elsewhere (integrations) may detach, and rules of the whole call need
    more than (activation, delta): those go to torch.func."""
    from ..rules.base import LayerRule

    rule = target.rule
    if rule is None or not type(rule).__module__.startswith("nnsim_hooks.rules."):
        return False
    # Rules of the whole call (nn.MultiheadAttention: q, k, v and several outputs) need more
    # than the first input and one output that this module's hooks capture.
    return type(rule).operands is LayerRule.operands and not getattr(rule, "multi_output", False)


class _Call:
    """One hooked module call: its input and output, and the output gradient per pass."""

    def __init__(self, target: Target, activation: torch.Tensor, output: torch.Tensor):
        self.target = target
        self.activation = activation
        self.output = output
        self.deltas: Dict[int, torch.Tensor] = {}
        self.version = activation._version
        self.module_name = target.name

    def check_unchanged(self) -> None:
        if self.activation._version != self.version:
            raise InputError(
                f"the input of module '{self.module_name}' ({type(self.target.module).__name__}) was modified in "
                "place after the module used it, so its per-sample gradient cannot be computed; avoid in-place ops "
                "on that tensor (for example set inplace=False on the following activation)"
            )

    def backprops(self, d: int) -> torch.Tensor:
        rows = [self.deltas.get(j) for j in range(d)]
        return torch.stack([torch.zeros_like(self.output) if r is None else r for r in rows])


class _Recorder:
    """Forward hooks on the fast-rule modules for one pass; nothing is left on the model."""

    def __init__(self, targets: List[Target], batch: int):
        self.targets = targets
        self.batch = batch
        self.calls: List[_Call] = []
        self.refused: Set[int] = set()  # ids of modules with a call the hooks cannot take
        self.pass_index = 0
        self._handles = []

    def __enter__(self) -> "_Recorder":
        try:
            for target in self.targets:
                self._handles.append(target.module.register_forward_hook(self._hook(target), with_kwargs=True))
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, target: Target):
        def forward_hook(module, args, kwargs, output):
            leaves, spec = tree_flatten(output)
            positions = [k for k, t in enumerate(leaves) if torch.is_tensor(t) and t.requires_grad]
            if not positions:
                return None  # ran without gradient: contributes nothing
            activation = next((a for a in args if torch.is_tensor(a)), None)
            ok = (
                len(positions) == 1
                and activation is not None
                and activation.dim() > 0
                and activation.shape[0] == self.batch
                and leaves[positions[0]].dim() > 0
                and leaves[positions[0]].shape[0] == self.batch
            )
            if not ok:  # several outputs, a shared table, another layout: torch.func takes it
                self.refused.add(id(module))
                return None
            leaves, replaced = copies_to_hook(leaves, spec, positions)
            call = _Call(target, activation, leaves[positions[0]])
            self.calls.append(call)

            def tensor_hook(grad, call=call):
                call.deltas[self.pass_index] = grad  # under create_graph: part of the graph

            call.output.register_hook(tensor_hook)
            return replaced

        return forward_hook


# -- per-layer blocks ------------------------------------------------------------------


def _blocks_of_grads(g: torch.Tensor, p: int) -> Blocks:
    """Blocks from per-sample gradients ``[2P, d, ...]``."""
    flat = g.reshape(g.shape[0], g.shape[1], -1)
    ga, gb = flat[:p], flat[p:]
    return (
        torch.einsum("pjn,pkn->pjk", ga, ga),
        torch.einsum("pjn,pkn->pjk", gb, gb),
        torch.einsum("pjn,pkn->pjk", ga, gb),
    )


def _factored_blocks(cols: torch.Tensor, rows: torch.Tensor, p: int, weight: bool, bias: bool) -> Blocks:
    """Blocks of a layer whose weight gradient is ``sum_u delta_u a_u^T``: ``cols``
    ``[2P, c, L]`` (activations / patches), ``rows`` ``[d, 2P, r, L]`` (output gradients)."""
    d, _, r, length = rows.shape
    c = cols.shape[1]
    out = [torch.zeros(p, d, d, dtype=rows.dtype, device=rows.device) for _ in range(3)]
    pairs = ((slice(0, p), slice(0, p)), (slice(p, None), slice(p, None)), (slice(0, p), slice(p, None)))
    if bias:
        s = rows.sum(-1)  # [d, 2P, r]
        for i, (x, y) in enumerate(pairs):
            out[i] = out[i] + torch.einsum("jpr,kpr->pjk", s[:, x], s[:, y])
    if not weight:
        return tuple(out)
    ghost_cost = 3 * p * length * length * (c + d * d * r)
    dense_cost = 2 * p * d * length * r * c + 3 * p * d * d * r * c
    if ghost_cost <= dense_cost:
        for i, (x, y) in enumerate(pairs):
            aa = torch.einsum("pcu,pcv->puv", cols[x], cols[y])
            dd = torch.einsum("jpru,kprv->pjkuv", rows[:, x], rows[:, y])
            out[i] = out[i] + torch.einsum("puv,pjkuv->pjk", aa, dd)
        return tuple(out)
    g = torch.einsum("jbru,bcu->bjrc", rows, cols)  # per-sample weight gradients
    return tuple(o + b for o, b in zip(out, _blocks_of_grads(g, p)))


def _layer_factors(call: _Call, backprops: torch.Tensor):
    """(cols, rows) for Linear and ungrouped convolutions, else None."""
    module = call.target.module
    rule = call.target.rule
    if type(rule) is LinearRule:
        a, g = _tokens(call.activation, backprops)
        return a.transpose(1, 2), g.transpose(2, 3)
    if type(rule) is ConvRule and module.groups == 1:
        cols, rows = rule._factors(module, call.activation, backprops)
        return cols[:, 0], rows[:, :, 0]
    return None


# -- the differentiable inverse square root ---------------------------------------------


class _InverseSqrt(torch.autograd.Function):
    """``K^{-1/2}`` of symmetric positive definite ``[P, d, d]``, with the divided-difference
    (Daleckii-Krein) backward, finite also for repeated eigenvalues (unlike eigh's)."""

    @staticmethod
    def forward(ctx, k):
        vals, vecs = torch.linalg.eigh(k)
        f = vals.rsqrt()
        ctx.save_for_backward(vals, vecs, f)
        return vecs @ torch.diag_embed(f) @ vecs.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad):
        vals, vecs, f = ctx.saved_tensors
        li, lj = vals[..., :, None], vals[..., None, :]
        fi, fj = f[..., :, None], f[..., None, :]
        diff = li - lj
        close = diff.abs() <= 1e-9 * torch.maximum(li.abs(), lj.abs())
        slope = -0.25 * (fi**3 + fj**3)  # f'(l) = -l^{-3/2} / 2, averaged for near-equal pairs
        phi = torch.where(close, slope, (fi - fj) / torch.where(close, torch.ones_like(diff), diff))
        inner = vecs.transpose(-1, -2) @ grad @ vecs
        return vecs @ (phi * inner) @ vecs.transpose(-1, -2)


def _kernel(blocks: Blocks, d: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """k ``[P]`` from the blocks and the mask of undefined pairs (k = 0 there, no gradient)."""
    kaa, kbb, kab = blocks
    if d == 1:
        xa, xb, xy = kaa[:, 0, 0], kbb[:, 0, 0], kab[:, 0, 0]
        undefined = (xa.detach() <= 0) | (xb.detach() <= 0)
        denom = torch.where(undefined, torch.ones_like(xa), xa * xb).sqrt()
        k = torch.where(undefined, torch.zeros_like(xy), xy / denom)
        return k, undefined
    with torch.no_grad():
        undefined = torch.zeros(kaa.shape[0], dtype=torch.bool, device=kaa.device)
        for m in (kaa, kbb):
            vals = torch.linalg.eigvalsh(m)
            top = vals[:, -1]
            undefined |= (vals[:, 0] <= SINGULAR_RTOL * top) | (top <= 0)
    eye = torch.eye(d, dtype=kaa.dtype, device=kaa.device).expand_as(kaa)
    mask = undefined[:, None, None]
    wa = _InverseSqrt.apply(torch.where(mask, eye, kaa))
    wb = _InverseSqrt.apply(torch.where(mask, eye, kbb))
    k = torch.einsum("pij,pjk,pki->p", wa, torch.where(mask, torch.zeros_like(kab), kab), wb) / d
    return k, undefined


# -- the term ---------------------------------------------------------------------------


class PairSimilarity:
    """The computation behind :meth:`Handle.pair_similarity` for one handle (it keeps
    which modules the hooks cannot take and which batch sizes were checked)."""

    def __init__(self, handle):
        self.handle = handle
        self._func_modules: Set[int] = set()  # ids of modules moved to torch.func by the check
        self._checked: Set[int] = set()  # batch sizes whose fast-path sums were checked

    def __call__(self, a, b, targets_a=None, targets_b=None) -> torch.Tensor:
        engine = self.handle.engine
        model = engine.model
        n_a, n_b = batch_size_of(a), batch_size_of(b)
        if n_a != n_b:
            raise InputError(
                f"pair_similarity compares a[i] with b[i]: a and b need the same length, got len(a) = {n_a} and "
                f"len(b) = {n_b}"
            )
        if n_a == 0:
            raise InputError("pair_similarity got no pairs: a and b are empty")
        if (targets_a is None) != (targets_b is None):
            raise InputError("give targets for both a and b (targets_a=, targets_b=) or for neither")
        try:
            inputs = batching.concat(a, b)
            targets = batching.concat(targets_a, targets_b)
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"a and b must be batches of the same kind of input: {exc}") from exc
        batch = check_inputs(model, inputs)
        device, _ = model_device_dtype(model)
        targets = check_targets(targets, batch, device)
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and uses_batch_statistics(module):
                raise BatchCouplingError(
                    batch_coupling_message(name, module)
                    + " For the training term: compute it with BatchNorm on its running statistics, "
                    "`with nnsim_hooks.training.batchnorm_running_stats(model): h.pair_similarity(a, b)`, "
                    "or use GroupNorm."
                )
        differentiable = torch.is_grad_enabled()
        with torch.enable_grad(), _math_attention():
            k = self._compute(engine, inputs, targets, n_a, differentiable)
        return k if differentiable else k.detach()

    def _compute(self, engine, inputs, targets, p: int, create_graph: bool, again: bool = True) -> torch.Tensor:
        model = engine.model
        batch = 2 * p
        targets_list = list(engine.targets.values())
        fast = [t for t in targets_list if _differentiable(t) and id(t.module) not in self._func_modules]
        with _Recorder(fast, batch) as recorder:
            outputs = call_model(model, inputs)
        if engine.output.name == "auto":
            engine.output = engine.output.resolve(outputs)
        spec: OutputSpec = engine.output
        values = spec(outputs, targets, batch)
        values = values if values.dim() == 2 else values.unsqueeze(1)
        d = values.shape[1]
        if not bool(torch.isfinite(values).all()):
            bad = (~torch.isfinite(values)).any(1).nonzero().flatten()[:10].tolist()
            raise NonFiniteGradientError(f"the model's outputs are NaN or Inf for samples {bad} of the 2P inputs")
        if not values.requires_grad:
            raise ModelError(
                "the differentiated output does not depend on any selected trainable parameter; check layers= "
                "and requires_grad"
            )

        # Which parameters the hooks take: every call of their module conforming, not shared
        # with a module on the torch.func path.
        by_module: Dict[int, List[_Call]] = {}
        for call in recorder.calls:
            by_module.setdefault(id(call.target.module), []).append(call)
        hooked: Dict[str, Tuple[Target, str]] = {}  # global name -> (target, local)
        func_names: Dict[str, torch.Tensor] = {}
        for t in targets_list:
            taken = id(t.module) in by_module and id(t.module) not in recorder.refused and t in fast
            for local, name in t.param_names.items():
                if taken and name not in func_names:
                    hooked[name] = (t, local)
                else:
                    func_names[name] = t.module.get_parameter(local)
        for name in func_names:
            hooked.pop(name, None)
        calls = [c for c in recorder.calls if any(n in hooked for n in c.target.param_names.values())]

        # delta for every hooked call, in the graph (create_graph), and the cotangent at the
        # model's outputs for the torch.func path.
        out_flat = tree_flatten(outputs)[0]
        out_positions = [i for i, t in enumerate(out_flat) if torch.is_tensor(t) and t.requires_grad]
        out_leaves = [out_flat[i] for i in out_positions]
        stops: List[torch.Tensor] = []
        for call in calls:
            if call.activation.requires_grad:
                stops.append(call.activation)
            else:
                stops += [call.target.module.get_parameter(l) for l in call.target.param_names]
        check = batch not in self._checked and bool(hooked)
        check_params = [call.target.module.get_parameter(l) for call in calls for l in call.target.param_names]
        wanted, where = _unique(stops + (out_leaves if func_names else []) + (check_params if check else []))
        cotangents: List[List[torch.Tensor]] = []
        batch_grads: List[Dict[int, Optional[torch.Tensor]]] = []
        for j in range(d):
            recorder.pass_index = j
            grads = torch.autograd.grad(
                values[:, j].sum(), wanted, create_graph=create_graph, retain_graph=True, allow_unused=True
            )
            if func_names:
                got = [grads[where[id(t)]] for t in out_leaves]
                cotangents.append([torch.zeros_like(t) if g is None else g for t, g in zip(out_leaves, got)])
            if check:
                batch_grads.append({id(q): grads[where[id(q)]] for q in check_params})
        for call in recorder.calls:
            call.check_unchanged()

        # Per-sample quantities of the hooked parameters.
        counts: Dict[int, int] = {}
        for call in calls:
            counts[id(call.target.module)] = counts.get(id(call.target.module), 0) + 1
        holders: Dict[str, int] = {}
        for t in targets_list:
            for name in t.param_names.values():
                holders[name] = holders.get(name, 0) + 1
        total: Optional[List[torch.Tensor]] = None
        summed: Dict[str, torch.Tensor] = {}  # per-sample gradients of shared / repeated parameters
        for call in calls:
            target = call.target
            module = target.module
            backprops = call.backprops(d)
            names = target.param_names
            alone = counts[id(module)] == 1 and all(holders[n] == 1 for n in names.values())
            factors = _layer_factors(call, backprops) if alone and not check else None
            if factors is not None:
                weight = module.weight.requires_grad and names.get("weight") in hooked
                bias = module.bias is not None and module.bias.requires_grad and names.get("bias") in hooked
                part = _factored_blocks(*factors, p, weight, bias)
                total = list(part) if total is None else [x + y for x, y in zip(total, part)]
                continue
            for local, g in target.rule.grad_sample(module, call.activation, backprops).items():
                name = names[local]
                if name in hooked:
                    summed[name] = summed[name] + g if name in summed else g
        if check:
            moved = self._check_sums(summed, batch_grads, hooked)
            if moved and again:
                return self._compute(engine, inputs, targets, p, create_graph, again=False)
            self._checked.add(batch)
        for g in summed.values():
            part = _blocks_of_grads(g, p)
            total = list(part) if total is None else [x + y for x, y in zip(total, part)]
        if func_names:
            for g in self._func_grads(model, func_names, inputs, cotangents, out_positions, batch).values():
                part = _blocks_of_grads(g, p)
                total = list(part) if total is None else [x + y for x, y in zip(total, part)]
        if total is None:
            raise ModelError("none of the selected parameters was reached by the model's forward pass")
        k, undefined = _kernel(tuple(total), d)
        if bool(undefined.any()):
            idx = undefined.nonzero().flatten().tolist()
            warnings.warn(
                f"nnsim_hooks: pair(s) {idx[:10]}{'...' if len(idx) > 10 else ''} have a zero or degenerate gradient "
                "on one side, so their similarity is undefined; it is returned as 0, with no gradient",
                RuntimeWarning,
                stacklevel=4,
            )
        return k

    def _check_sums(self, summed, batch_grads, hooked) -> bool:
        """Per-sample gradients must add up to the batch gradient; modules of parameters
        that do not move to torch.func (their parameter has uses the hooks miss). True if
        any moved."""
        moved = False
        for name, (target, local) in hooked.items():
            param = target.module.get_parameter(local)
            if name not in summed or id(param) not in batch_grads[0]:
                continue
            with torch.no_grad():
                for j, grads in enumerate(batch_grads):
                    ref = grads[id(param)]
                    ref = torch.zeros_like(param) if ref is None else ref.detach()
                    got = summed[name][:, j].detach().sum(0)
                    scale = float(ref.abs().max()) if ref.numel() else 0.0
                    tol = 1e-4 if ref.dtype == torch.float64 else 1e-3
                    if not torch.allclose(got, ref, rtol=tol, atol=tol * scale + 1e-12):
                        logger.info("pair_similarity: %s has uses the hooks do not see; using torch.func for %r",
                                    name, target.name)
                        self._func_modules.add(id(target.module))
                        moved = True
                        break
        return moved

    def _func_grads(self, model: nn.Module, func_names: Dict[str, torch.Tensor], inputs, cotangents, out_positions,
                    batch: int):
        """Per-sample gradients ``[2P, d, *shape]`` of ``func_names`` by a vjp of the whole
        model per sample (vmap), each output row weighted by the batched pass's cotangent."""
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        rest = {n: q for n, q in params.items() if n not in func_names}
        flat, spec = tree_flatten(inputs)
        slots = [i for i, t in enumerate(flat) if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == batch]
        cots = [torch.stack([c[k] for c in cotangents], 1) for k in range(len(cotangents[0]))]  # [2P, d, ...]

        def per_sample(chosen, sample_inputs, sample_cots):
            def run(chosen):
                values = list(flat)
                for i, x in zip(slots, sample_inputs):
                    values[i] = x.unsqueeze(0)
                out = functional_call(model, {**rest, **chosen, **buffers}, _as_args(tree_unflatten(values, spec)),
                                      _as_kwargs(tree_unflatten(values, spec)), strict=False)
                out = batched_outputs(out, 1)
                leaves = tree_flatten(out)[0]
                return tuple(leaves[i] for i in out_positions)

            _, vjp_fn = vjp(run, chosen)
            rows = [vjp_fn(tuple(c[j].unsqueeze(0) for c in sample_cots))[0] for j in range(sample_cots[0].shape[0])]
            return {n: torch.stack([r[n] for r in rows]) for n in chosen}

        with warnings.catch_warnings(), _ComposedLayerNorm():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return vmap(per_sample, in_dims=(None, 0, 0), randomness="different")(
                dict(func_names), [flat[i] for i in slots], cots
            )


class _ComposedLayerNorm(TorchFunctionMode):
    """``layer_norm`` written as plain ops while the torch.func path runs: in PyTorch 2.x
    the fused kernel's derivatives are wrong when regular autograd differentiates
    through ``vmap(vjp(...))`` of it (values right, outer gradients off by percents; see
    tests/test_pair_similarity.py), while the composed ops are right."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.layer_norm, torch.layer_norm):
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *rest):
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = input.mean(dims, keepdim=True)
    centred = input - mean
    out = centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _unique(tensors: List[torch.Tensor]):
    """The tensors without repeats, and each one's position there by id."""
    out: List[torch.Tensor] = []
    where: Dict[int, int] = {}
    for t in tensors:
        if id(t) not in where:
            where[id(t)] = len(out)
            out.append(t)
    return out, where


def _as_args(inputs):
    if isinstance(inputs, dict):
        return ()
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    return (inputs,)


def _as_kwargs(inputs):
    return dict(inputs) if isinstance(inputs, dict) else {}
