"""What the audit differentiates: label-free output functions and their defaults.

Every function here ignores its ``targets`` argument: the audit stores labels beside
the features but never lets them shape the similarity (a wrong label would pull a
sample towards the wrong class and hide itself).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..errors import InputError
from ..engine.outputs import contrast, total

#: Neighbours kept per sample (the label vote, the galleries, the cleanlab graph).
DEFAULT_K = 10
#: Sketch dimension of the audit's features for a scalar output.
DEFAULT_SKETCH_DIM = 1024
#: Classifiers with at most this many classes use output="full" by default (see audit()).
MAX_FULL_CLASSES = 16
#: With output="full" and no sketch_dim given, each of the C outputs gets
#: max(MIN_FULL_SKETCH_DIM, FULL_FEATURE_BUDGET // C) dimensions.
FULL_FEATURE_BUDGET = 2048
MIN_FULL_SKETCH_DIM = 128
#: Folder (inside out_dir) of the second index, for density and denoising, when the
#: neighbours come from another output than the predicted class's contrast.
DENOISING_INDEX = "index-denoising"
#: Output functions the audit accepts by name: all of them ignore labels.
OUTPUTS = ("contrast", "full", "logit", "sum")


def contrast_predicted(outputs: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The authors' classifier scalar for the *predicted* class, whatever the targets."""
    return contrast(outputs, None)


def full_outputs(outputs: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every output of a sample (the whitened d x d kernel; the paper, §1)."""
    return outputs.reshape(outputs.shape[0], -1)


def logit_predicted(outputs: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    return outputs.gather(1, outputs.argmax(1, keepdim=True)).squeeze(1)


def sum_outputs(outputs: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    return total(outputs)


_LABEL_FREE = {"contrast": contrast_predicted, "full": full_outputs, "logit": logit_predicted, "sum": sum_outputs}


def default_output(classifier: bool, num_classes: Optional[int]) -> str:
    """``"full"`` for classifiers with at most :data:`MAX_FULL_CLASSES` classes,
    ``"contrast"`` for larger ones, ``"sum"`` for other models."""
    if not classifier:
        return "sum"
    return "full" if num_classes is not None and num_classes <= MAX_FULL_CLASSES else "contrast"


def default_sketch_dim(output_name: str, num_classes: Optional[int]) -> int:
    if output_name == "full" and num_classes:
        return max(MIN_FULL_SKETCH_DIM, FULL_FEATURE_BUDGET // num_classes)
    return DEFAULT_SKETCH_DIM


def label_free_output(output: Union[None, str, Callable], classifier: bool) -> Callable:
    """The output function for ``audit(output=...)``: never reads targets."""
    if output is None:
        output = "contrast" if classifier else "sum"
    if callable(output):
        return output
    if output not in _LABEL_FREE:
        raise InputError(
            f"audit(output={output!r}): the audit needs a label-free output, one of {OUTPUTS} or a callable "
            "fn(outputs, targets) that ignores targets ('loss' would let a wrong label decide the similarity)"
        )
    if output in ("contrast", "logit") and not classifier:
        raise InputError(f"audit(output={output!r}) needs a classifier returning logits [B, C] with C >= 2")
    return _LABEL_FREE[output]
