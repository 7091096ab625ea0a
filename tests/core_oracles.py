"""Independent references for the core tests.

Nothing here uses nnsim_hooks' own maths: per-sample gradients come from torch.func
(``vmap`` over samples of ``grad`` / ``jacrev`` of a ``functional_call``), the output
functions are re-derived from their definitions in the paper (in log-probability
space, not with the logit shortcut the library uses), and kernels are brute force over
all pairs of flattened gradients.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

# -- the differentiated outputs, for ONE sample ------------------------------------------
# Each takes the model's output for one sample (no batch dimension) and that sample's
# target (a 0-dim tensor, or None) and returns a scalar or a [d] vector.


def ref_contrast(z: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    """log p_c - mean_{c' != c} log p_c' (the paper, section 1), c = label or prediction."""
    logp = F.log_softmax(z, dim=-1)
    chosen = _one_hot(z.argmax() if t is None else t, z)
    return (logp * chosen).sum() - (logp * (1 - chosen)).sum() / (z.shape[-1] - 1)


def _one_hot(c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """One-hot row for class c, written with a comparison so that vmap can batch it."""
    return (torch.arange(z.shape[-1], device=z.device) == c).to(z.dtype)


def ref_logit(z: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    return z.max()


def ref_loss(z: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    return -(F.log_softmax(z, dim=-1) * _one_hot(t, z)).sum()


def ref_sum(z: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    return z.sum()


def ref_full(z: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    return z.reshape(-1)


REFERENCE_OUTPUTS: Dict[str, Callable] = {
    "contrast": ref_contrast,
    "logit": ref_logit,
    "loss": ref_loss,
    "sum": ref_sum,
    "full": ref_full,
}


def two_outputs(outputs: torch.Tensor, targets=None) -> torch.Tensor:
    """A user callable with d = 2 values per sample (batched form, given to attach)."""
    flat = outputs.reshape(outputs.shape[0], -1)
    return torch.stack([flat[:, 0] - 2.0 * flat[:, 1], (flat**2).mean(1)], dim=1)


def ref_two_outputs(z: torch.Tensor, t) -> torch.Tensor:
    """The same callable written for one sample."""
    flat = z.reshape(-1)
    return torch.stack([flat[0] - 2.0 * flat[1], (flat**2).mean()])


# -- per-sample gradients with torch.func -------------------------------------------------


def _split_params(model: nn.Module):
    trainable, frozen = {}, {}
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else frozen)[name] = p.detach()
    buffers = {name: b for name, b in model.named_buffers()}
    return trainable, frozen, buffers


def func_per_sample_grads(
    model: nn.Module, inputs: torch.Tensor, value_fn: Callable, targets: Optional[torch.Tensor] = None
) -> Dict[str, torch.Tensor]:
    """``vmap`` over samples of ``jacrev`` of ``value_fn(model(x)[0], t)`` with respect to the
    trainable parameters: ``[B, *shape]`` for a scalar value, ``[B, d, *shape]`` for ``[d]``."""
    trainable, frozen, buffers = _split_params(model)

    def value(params, x, t):
        out = functional_call(model, (params, frozen, buffers), (x.unsqueeze(0),))
        return value_fn(out[0], t)

    try:
        if targets is None:
            return vmap(jacrev(lambda p, x: value(p, x, None)), in_dims=(None, 0))(trainable, inputs)
        return vmap(jacrev(value), in_dims=(None, 0, 0))(trainable, inputs, targets)
    except RuntimeError:
        # A few ops lack vmap support (PReLU with one weight); same maths, one sample at a time.
        rows = []
        for b in range(inputs.shape[0]):
            t = None if targets is None else targets[b]
            rows.append(jacrev(value)(trainable, inputs[b], t))
        return {name: torch.stack([r[name] for r in rows]) for name in trainable}


def output_jacobian(model: nn.Module, inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample Jacobians of the flattened model output: ``[B, C, *shape]``."""
    return func_per_sample_grads(model, inputs, ref_full)


def chain_rule(
    jacobian: Dict[str, torch.Tensor], outputs: torch.Tensor, value_fn: Callable, targets=None
) -> Dict[str, torch.Tensor]:
    """Per-sample gradients of ``value_fn(z, t)`` from the Jacobian of z: ``J^T dvalue/dz``.

    Lets one (expensive) Jacobian serve as the oracle for every output function."""
    z = outputs.detach().reshape(outputs.shape[0], -1)
    if targets is None:
        w = vmap(jacrev(lambda zi: value_fn(zi, None)))(z)
    else:
        w = vmap(jacrev(value_fn))(z, targets)
    # w: [B, C] (scalar value) or [B, d, C]
    out = {}
    for name, jac in jacobian.items():
        flat = jac.reshape(jac.shape[0], jac.shape[1], -1)  # [B, C, P]
        g = torch.einsum("bc,bcp->bp", w, flat) if w.dim() == 2 else torch.einsum("bdc,bcp->bdp", w, flat)
        out[name] = g.reshape(*g.shape[:-1], *jac.shape[2:])
    return out


# -- comparisons ---------------------------------------------------------------------------


def assert_grads_close(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], rtol=1e-4, atol=1e-5):
    """Same parameter names, same shapes, equal values.

    ``atol`` is relative to the largest reference gradient of the whole model: a bias in
    front of a normalisation has a true gradient of zero, which float32 round-off turns
    into noise of order 1e-7 of the other gradients."""
    assert list(got) == list(ref), f"parameter names differ: missing {set(ref) - set(got)}, extra {set(got) - set(ref)}"
    scale = max(float(r.abs().max()) for r in ref.values())
    assert scale > 0, "the reference gradients are all zero: the test cannot fail"
    for name in ref:
        g, r = got[name], ref[name]
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != reference {tuple(r.shape)}"
        err = (g.double() - r.double()).abs()
        bound = atol * scale + rtol * r.double().abs()
        assert bool((err <= bound).all()), f"{name}: max error {float(err.max()):.3e} (scale {scale:.3e})"


def parameterised_depth(model: nn.Module) -> int:
    """How many modules hold parameters of their own: the layers a gradient's rounding
    errors can pile up through on the way back."""
    return sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))


def rounding_tolerance(dtype: torch.dtype, depth: int, factor: float = 10.0) -> float:
    """The error allowed on a gradient computed in ``dtype`` through ``depth`` layers,
    relative to the largest true gradient of the model (``atol`` of
    :func:`assert_grads_close`): ``factor`` x the dtype's epsilon x the depth (each
    layer's backward adds a few epsilons of the largest gradient)."""
    return factor * torch.finfo(dtype).eps * depth


def batch_backward_error(model: nn.Module, inputs: torch.Tensor, truth: Dict[str, torch.Tensor], output: str) -> float:
    """How far torch's own backward of the whole batch, in the model's dtype, is from the
    float64 truth (summed over samples), relative to the largest true gradient.

    Hooks capture what this backward computes, so their per-sample gradients cannot be more
    accurate than it; and it rounds differently by batch size (a batch of 2 may take another
    convolution algorithm than a batch of 1): 2.4e-3 of the largest gradient was seen on
    DenseNet121-3D in float32, where the float32 loop over samples was within 1e-7."""
    ref_fn = REFERENCE_OUTPUTS[output]
    params = dict(model.named_parameters())
    with torch.enable_grad():
        z = model(inputs)
        total = sum(ref_fn(z[b], None).sum() for b in range(z.shape[0]))
        grads = torch.autograd.grad(total, [params[name] for name in truth], allow_unused=True)
    scale = max(float(t.abs().max()) for t in truth.values())
    return max(
        float((t.sum(0) - (0 if g is None else g.double())).abs().max()) for g, t in zip(grads, truth.values())
    ) / scale


def assert_grads_match_float64_truth(grads_of: Callable, truth_of: Callable, model: nn.Module,
                                     inputs: torch.Tensor, output: str) -> Dict[str, torch.Tensor]:
    """``grads_of(model, inputs)`` (the per-sample gradients under test) against the truth
    ``truth_of(model64, inputs64)`` computed on a float64 copy of the model and inputs.

    In float64 the gradients under test must match the truth to float64 rounding
    (:func:`rounding_tolerance`). In the model's float32 they must match it to the larger
    of that tolerance in float32 and ten times the error of torch's own float32 backward
    on the same batch (:func:`batch_backward_error`), both derived from the float64
    truth; a float32 loop as the truth at a fixed tolerance made the test depend on how
    each batch size rounds. Returns the truth."""
    import copy

    depth = parameterised_depth(model)
    model64, inputs64 = copy.deepcopy(model).double(), inputs.double()
    truth = truth_of(model64, inputs64)
    assert all(t.dtype == torch.float64 for t in truth.values()), "the truth was not computed in float64"
    assert_grads_close(grads_of(model64, inputs64), truth, rtol=0, atol=rounding_tolerance(torch.float64, depth))
    tolerance = max(rounding_tolerance(torch.float32, depth), 10 * batch_backward_error(model, inputs, truth, output))
    assert_grads_close(grads_of(model, inputs), truth, rtol=0, atol=tolerance)
    return truth


def flatten_grads(grads: Dict[str, torch.Tensor], d: Optional[int] = None) -> torch.Tensor:
    """``[B, P]`` (or ``[B, d, P]`` when d is given) in float64, parameters in dict order."""
    if d is None:
        return torch.cat([g.reshape(g.shape[0], -1).double() for g in grads.values()], dim=1)
    return torch.cat([g.reshape(g.shape[0], d, -1).double() for g in grads.values()], dim=2)


def brute_cosine(flat_a: torch.Tensor, flat_b: torch.Tensor) -> torch.Tensor:
    """Every pair's cosine, one pair at a time."""
    out = torch.empty(flat_a.shape[0], flat_b.shape[0], dtype=torch.float64)
    for i, u in enumerate(flat_a):
        for j, v in enumerate(flat_b):
            out[i, j] = torch.dot(u, v) / (u.norm() * v.norm())
    return out


def _inv_sqrt(k: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(k)
    return vecs @ torch.diag(vals.rsqrt()) @ vecs.T


def brute_matrix_kernel(jac_a: torch.Tensor, jac_b: torch.Tensor) -> torch.Tensor:
    """``Tr(K(x,x)^-1/2 K(x,x') K(x',x')^-1/2) / d`` for every pair; jac ``[B, d, P]``."""
    d = jac_a.shape[1]
    out = torch.empty(jac_a.shape[0], jac_b.shape[0], dtype=torch.float64)
    for i, ja in enumerate(jac_a):
        for j, jb in enumerate(jac_b):
            k_c = _inv_sqrt(ja @ ja.T) @ (ja @ jb.T) @ _inv_sqrt(jb @ jb.T)
            out[i, j] = torch.trace(k_c) / d
    return out


# -- model snapshots -----------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    """Everything about a model that attach/use/detach must leave as it was."""
    modules = {}
    for name, m in model.named_modules():
        hooks = {k: list(v.keys()) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)}
        modules[name] = {
            "type": type(m),
            "dict_keys": sorted(vars(m)),
            "hooks": hooks,
            "training": m.training,
            "params": list(m._parameters),
            "buffers": list(m._buffers),
            "children": list(m._modules),
        }
    params = {}
    for name, p in model.named_parameters():
        params[name] = {
            "id": id(p),
            "requires_grad": p.requires_grad,
            "grad": p.grad,
            "attrs": sorted(vars(p)),
            "backward_hooks": None if p._backward_hooks is None else list(p._backward_hooks),
            "post_accumulate_hooks": getattr(p, "_post_accumulate_grad_hooks", None),
        }
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    import torch.nn.modules.module as module_lib

    globals_ = {
        k: len(getattr(module_lib, k))
        for k in dir(module_lib)
        if k.startswith("_global_") and isinstance(getattr(module_lib, k), dict)
    }
    return {"modules": modules, "params": params, "state": state, "globals": globals_}


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["globals"] == after["globals"], "global module hooks changed"
    assert list(before["modules"]) == list(after["modules"]), "module names changed"
    for name, b in before["modules"].items():
        a = after["modules"][name]
        assert a == b, f"module '{name}' changed: {_diff(b, a)}"
    assert list(before["params"]) == list(after["params"]), "parameter names changed"
    for name, b in before["params"].items():
        a = after["params"][name]
        assert a["grad"] is None and b["grad"] is None, f"{name}.grad was created"
        assert a == b, f"parameter '{name}' changed: {_diff(b, a)}"
    assert list(before["state"]) == list(after["state"]), "state_dict keys changed"
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"state_dict['{k}'] changed"


def _diff(b: dict, a: dict) -> str:
    return "; ".join(f"{k}: {b[k]!r} -> {a.get(k)!r}" for k in b if a.get(k) != b[k])
