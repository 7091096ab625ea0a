"""Where a model lives: the one place that decides which device and dtype inputs,
targets and exact computations are moved to, and which device a run asks for
(``--device``, one rank per GPU under torchrun)."""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .errors import InputError


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's first parameter, or CPU float32 for a model
    without parameters (it then runs wherever its inputs are, and the CPU is the safe
    default for what we allocate)."""
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def local_rank() -> Optional[int]:
    """torchrun's ``LOCAL_RANK`` (this process's place on its machine), or None outside
    torchrun."""
    value = os.environ.get("LOCAL_RANK")
    if value is None:
        return None
    try:
        rank = int(value)
    except ValueError:
        raise InputError(f"the environment variable LOCAL_RANK={value!r} is not an integer (set by torchrun)") from None
    if rank < 0:
        raise InputError(f"the environment variable LOCAL_RANK={rank} is negative (set by torchrun)")
    return rank


def choose_device(requested: Union[str, torch.device, None] = "auto", *, rank: Optional[int] = None) -> torch.device:
    """The device a run computes on.

    ``"auto"`` (or None): under torchrun, this rank's own GPU ``cuda:LOCAL_RANK`` (one
    rank per GPU); else ``cuda:0`` when CUDA is there; else the CPU. ``"cuda"`` means
    the same GPU as auto and fails without CUDA; ``"cuda:N"`` a given GPU; ``"cpu"`` the
    CPU. A GPU that is not there is an :class:`InputError` naming how many there are.
    ``rank``: a process-group rank to place by (``rank % GPUs``) when LOCAL_RANK is unset
    (processes started without torchrun).
    """
    text = "auto" if requested is None else str(requested).strip().lower()
    if text == "auto":
        return _own_gpu(rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"device {requested!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise InputError(f"device {requested!r} is not supported: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(
            f"device {requested!r} asks for a GPU but torch sees no CUDA device (torch {torch.__version__}, "
            "built with CUDA " + str(torch.version.cuda) + "); install a CUDA build of torch or use --device cpu"
        )
    if device.index is None:
        return _own_gpu(rank)
    count = torch.cuda.device_count()
    if device.index >= count:
        raise InputError(f"device {requested!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def _own_gpu(fallback_rank: Optional[int]) -> torch.device:
    """``cuda:LOCAL_RANK`` under torchrun, else GPU ``fallback_rank % GPUs`` (0 without one);
    a torchrun rank without a GPU of its own (more processes per node than GPUs) is an
    error, not a silent second rank on one GPU."""
    count = torch.cuda.device_count()
    rank = local_rank()
    if rank is None:
        return torch.device("cuda", (fallback_rank or 0) % count)
    if rank >= count:
        raise InputError(
            f"LOCAL_RANK={rank} but this machine has {count} GPU(s): run one process per GPU "
            f"(torchrun --nproc-per-node={count}) or pass --device cpu"
        )
    return torch.device("cuda", rank)
