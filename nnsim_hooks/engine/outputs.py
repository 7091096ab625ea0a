"""What is differentiated: the paper's f (the paper section 1).

``output=`` takes a name or a callable ``fn(outputs, targets) -> Tensor[B] | Tensor[B, d]``:

- ``"contrast"``: ``log p_c - mean_{c' != c} log p_c'``, the authors' scalar for
  classifiers, with c the label when targets are given and the predicted class
  otherwise. It equals ``z_c - mean_{c' != c} z_c'`` on the logits (the log-sum-exp
  cancels), so it is invariant to a shift of the logits.
- ``"logit"``: the logit of the predicted class.
- ``"loss"``: cross-entropy with the targets (needs targets).
- ``"sum"``: the sum of all outputs of a sample (regression, dense outputs).
- ``"full"``: every output is its own row: the d x d matrix kernel, whitened, with the
  scalar similarity Tr(K_C)/d.
- ``"auto"`` (the default): ``"contrast"`` for classifier outputs ``[B, C]`` with C >= 2,
  ``"sum"`` otherwise. Contrast is the default for classifiers because it is the
  authors' choice, it needs no labels (so similarities do not depend on possibly noisy
  labels, which the audit relies on), and unlike ``"loss"`` it does not vanish on
  confidently right predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..errors import InputError, OutputSpecError

OutputFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
NAMES = ("auto", "contrast", "logit", "loss", "sum", "full")
#: The outputs that read one class of classifier logits ``[B, C]``: with them, model
#: outputs ``[B, C]`` are class scores (a classification task, softmax probabilities).
CLASSIFIER_OUTPUTS = ("contrast", "logit", "loss")


def _logits(outputs, name: str) -> torch.Tensor:
    if not torch.is_tensor(outputs) or outputs.dim() != 2 or outputs.shape[1] < 2:
        shape = tuple(outputs.shape) if torch.is_tensor(outputs) else type(outputs).__name__
        raise OutputSpecError(
            f"output='{name}' needs classifier logits of shape [B, C] with C >= 2, but the model returned "
            f"{shape}; use output='sum' or 'full', or pass a callable fn(outputs, targets) -> Tensor[B] or [B, d]"
        )
    return outputs


def _classes(logits: torch.Tensor, targets: Optional[torch.Tensor], name: str) -> torch.Tensor:
    if targets is None:
        return logits.argmax(1)
    targets = torch.as_tensor(targets, device=logits.device)
    if targets.shape != (logits.shape[0],) or targets.is_floating_point():
        raise InputError(
            f"output='{name}' needs integer class targets of shape [{logits.shape[0]}], got "
            f"{targets.dtype} of shape {tuple(targets.shape)}"
        )
    bad = (targets < 0) | (targets >= logits.shape[1])
    if bool(bad.any()):
        raise InputError(
            f"targets must lie in [0, {logits.shape[1]}) for {logits.shape[1]} classes; "
            f"got {targets[bad][:5].tolist()} at positions {bad.nonzero().flatten()[:5].tolist()}"
        )
    return targets.long()


def contrast(outputs: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    z = _logits(outputs, "contrast")
    c = _classes(z, targets, "contrast").unsqueeze(1)
    z_c = z.gather(1, c).squeeze(1)
    return z_c - (z.sum(1) - z_c) / (z.shape[1] - 1)


def logit(outputs: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    z = _logits(outputs, "logit")
    return z.gather(1, z.argmax(1, keepdim=True)).squeeze(1)


def loss(outputs: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    z = _logits(outputs, "loss")
    if targets is None:
        raise InputError("output='loss' needs targets: pass targets=... (class indices)")
    return F.cross_entropy(z, _classes(z, targets, "loss"), reduction="none")


def total(outputs, targets=None) -> torch.Tensor:
    if not torch.is_tensor(outputs):
        raise OutputSpecError(
            f"output='sum' needs the model to return a tensor, got {type(outputs).__name__}; "
            "pass a callable fn(outputs, targets) that picks the tensor"
        )
    return outputs.reshape(outputs.shape[0], -1).sum(1)


def full(outputs, targets=None) -> torch.Tensor:
    if not torch.is_tensor(outputs):
        raise OutputSpecError(f"output='full' needs the model to return a tensor, got {type(outputs).__name__}")
    return outputs.reshape(outputs.shape[0], -1)


BUILTIN = {"contrast": contrast, "logit": logit, "loss": loss, "sum": total, "full": full}


@dataclass
class OutputSpec:
    """A resolved ``output=``: the function and how to report it."""

    name: str
    fn: Optional[OutputFn]
    #: False for a user's callable
    builtin: bool = True

    def resolve(self, outputs) -> "OutputSpec":
        """Settle ``"auto"`` on the first batch's outputs."""
        if self.name != "auto":
            return self
        if torch.is_tensor(outputs) and outputs.dim() == 2 and outputs.shape[1] >= 2:
            return OutputSpec("contrast", contrast)
        return OutputSpec("sum", total)

    def __call__(self, outputs, targets, batch: int) -> torch.Tensor:
        values = self.fn(outputs, targets)
        return check_values(values, batch, self.name)


def make_output_spec(output: Union[str, OutputFn]) -> OutputSpec:
    if callable(output):
        return OutputSpec(getattr(output, "__name__", "callable"), output, builtin=False)
    if output == "auto":
        return OutputSpec("auto", None)
    if output in BUILTIN:
        return OutputSpec(output, BUILTIN[output])
    raise OutputSpecError(f"output={output!r} is not one of {NAMES} nor a callable fn(outputs, targets)")


def batched_outputs(outputs, batch: int):
    """The model's outputs with the batch first, also for a batch of one sample.

    A model that ends with ``.squeeze()`` turns ``[B, 1]`` into ``[B]``, and a one-sample
    batch ``[1, 1]`` into a 0-d tensor: that scalar is sample 0's output, so it becomes
    ``[1]``. A 0-d output for a larger batch is one number for the whole batch (a mean,
    a loss) and has no per-sample meaning."""
    if not torch.is_tensor(outputs) or outputs.dim() > 0:
        return outputs
    if batch == 1:
        return outputs.reshape(1)
    raise OutputSpecError(
        f"the model returned a 0-d tensor for a batch of {batch} samples; expected its outputs with the batch "
        f"first, [{batch}, ...] (one row per sample). If it reduces over the batch (a mean or a loss), return the "
        "per-sample values instead"
    )


def check_values(values, batch: int, name: str) -> torch.Tensor:
    """The differentiated values must be ``[B]`` or ``[B, d]``."""
    if not torch.is_tensor(values):
        raise OutputSpecError(f"output function '{name}' returned {type(values).__name__}, expected a Tensor [B] or [B, d]")
    if values.dim() not in (1, 2) or values.shape[0] != batch:
        raise OutputSpecError(
            f"output function '{name}' returned shape {tuple(values.shape)}; expected [{batch}] (one value "
            f"per sample) or [{batch}, d] (d values per sample) for a batch of {batch}"
        )
    if not values.is_floating_point():
        raise OutputSpecError(f"output function '{name}' returned {values.dtype}; it must be floating point")
    return values


def check_no_mixing(spec: OutputSpec, outputs, targets, values: torch.Tensor) -> None:
    """Each sample's value must depend on that sample alone: evaluate the two halves of
    the batch separately and compare (a batch mean, a softmax over the batch... differ)."""
    batch = values.shape[0]
    if batch < 2 or not torch.is_tensor(outputs):
        return
    half = batch // 2
    with torch.no_grad():
        parts = []
        for sl in (slice(0, half), slice(half, batch)):
            t = None if targets is None else targets[sl]
            parts.append(spec.fn(outputs.detach()[sl], t))
        if any(not torch.is_tensor(p) or p.shape[1:] != values.shape[1:] for p in parts):
            raise OutputSpecError(f"output function '{spec.name}' gives shapes that depend on the batch size")
        joined = torch.cat(parts)
        if not torch.allclose(joined, values.detach(), rtol=1e-4, atol=1e-5, equal_nan=True):
            raise OutputSpecError(
                f"output function '{spec.name}' mixes samples: evaluated on half the batch it gives other "
                "values for the same samples. It must compute each sample's value from that sample's outputs "
                "alone (no batch means, no normalisation across the batch)."
            )
