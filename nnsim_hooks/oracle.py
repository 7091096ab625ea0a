"""Independent references to check the hooks against, on any model.

:func:`per_sample_loop` differentiates one sample at a time with plain autograd: slow,
simple and independent of the hooks. :func:`check_per_sample_gradients` compares the
two, for users who want to verify their own model before trusting the numbers.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from .data import batching
from .engine.outputs import make_output_spec
from .validation import batch_size_of, call_model


def per_sample_loop(model: nn.Module, inputs, targets=None, *, output="auto", names=None) -> Dict[str, torch.Tensor]:
    """Per-sample gradients by a loop over samples: ``[B, *shape]`` or ``[B, d, *shape]``."""
    spec = make_output_spec(output)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
    batch = batch_size_of(inputs)
    rows: Dict[str, list] = {n: [] for n, _ in params}
    vector = False
    for b in range(batch):
        x = batching.take(inputs, slice(b, b + 1))
        t = None if targets is None else torch.as_tensor(targets)[b : b + 1]
        with torch.enable_grad():
            out = call_model(model, x)
            spec = spec.resolve(out)
            values = spec(out, t, 1)
            vector = values.dim() == 2
            values = values.reshape(1, -1)
            per_output = {n: [] for n, _ in params}
            for j in range(values.shape[1]):
                grads = torch.autograd.grad(
                    values[0, j], [p for _, p in params], retain_graph=j < values.shape[1] - 1, allow_unused=True
                )
                for (n, p), g in zip(params, grads):
                    per_output[n].append(torch.zeros_like(p) if g is None else g)
        for n in rows:
            rows[n].append(torch.stack(per_output[n]))
    out = {n: torch.stack(r) for n, r in rows.items()}
    return out if vector else {n: g[:, 0] for n, g in out.items()}


def check_per_sample_gradients(
    model: nn.Module, inputs, targets=None, *, output="auto", layers=None, rtol: float = 1e-4, atol: float = 1e-6
) -> Dict[str, float]:
    """Compare :meth:`Handle.per_sample_gradients` with :func:`per_sample_loop`.

    Returns the largest absolute difference per parameter, relative to the parameter's
    largest gradient; raises ``AssertionError`` naming the parameters that disagree.
    """
    from .attach import attach

    with attach(model, output=output, layers=layers) as handle:
        hooked = handle.per_sample_gradients(inputs, targets)
        names = set(handle.parameter_names)
    reference = per_sample_loop(model, inputs, targets, output=output, names=names)
    errors: Dict[str, float] = {}
    bad = []
    for name, ref in reference.items():
        got = hooked.get(name)
        if got is None:
            bad.append(f"{name}: missing")
            continue
        scale = ref.abs().max().item()
        errors[name] = (got - ref).abs().max().item() / (scale if scale > 0 else 1.0)
        if not torch.allclose(got, ref, rtol=rtol, atol=atol + rtol * scale):
            bad.append(f"{name}: relative error {errors[name]:.2e}")
    if bad:
        raise AssertionError("per-sample gradients disagree with the per-sample loop: " + "; ".join(bad))
    return errors
