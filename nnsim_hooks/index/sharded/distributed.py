"""Process-group plumbing for building and querying an index from several processes.

Replicated inference, not DDP: every rank runs the same model on its own contiguous
share of the dataset. Nothing but small summaries, step statuses, moments and query
results crosses between ranks, always over a gloo group of our own (created once, CPU
tensors, so it works beside an NCCL training group) with timeouts:

- :func:`agree` all-gathers a small summary (data length, model fingerprint, recipe) and
  raises the same error on every rank when one differs, naming it;
- :func:`everywhere` runs one step on every rank (or :func:`on_main`: rank 0 only) and
  exchanges its outcome, so that a rank that fails makes every rank raise instead of
  leaving the others waiting in a collective forever.

A rank that dies (kill -9) is noticed by torchrun, which stops the others; a rank that
hangs is named by a monitored barrier after ``NNSIM_DIST_TIMEOUT`` seconds (default 300)
for the agreement, ``NNSIM_DIST_WAIT`` (default 7200) after long steps (extraction).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ... import errors
from ...errors import DistributedError, InputError, NnsimError

logger = logging.getLogger(__name__)

_CONTROL: Dict[Any, Any] = {}  # default group -> our gloo control group


def _seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise InputError(f"the environment variable {name}={os.environ[name]!r} is not a number of seconds") from None


def agree_timeout() -> float:
    return _seconds("NNSIM_DIST_TIMEOUT", 300.0)


def wait_timeout() -> float:
    return _seconds("NNSIM_DIST_WAIT", 7200.0)


@dataclass(frozen=True)
class Context:
    """This process's place in the process group the work is shared over."""

    rank: int
    world: int
    backend: str
    group: Any  # our gloo control group

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self):
        """Where this rank computes: its own GPU (``cuda:LOCAL_RANK``, one rank per GPU) when
        CUDA is there, else the CPU (see :func:`nnsim_hooks.model_device.choose_device`)."""
        from ...model_device import choose_device

        return choose_device("auto", rank=self.rank)

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"


def current(distributed: Optional[bool] = None) -> Optional[Context]:
    """The process group to share work over, or None for one process.

    ``distributed``: None uses an initialised group of more than one process when there is
    one; False never does; True requires one (an :class:`InputError` otherwise).
    """
    if distributed not in (None, True, False):
        raise InputError(f"distributed must be None, True or False, got {distributed!r}")
    if distributed is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise InputError(
                "distributed=True but no torch.distributed process group is initialised: launch with torchrun and "
                "call torch.distributed.init_process_group() (or nnsim_hooks.index.sharded.distributed.init_from_env()) first"
            )
        return None
    world = dist.get_world_size()
    if world == 1:
        return None
    return Context(dist.get_rank(), world, dist.get_backend(), _control_group())


def _control_group():
    """A gloo group over all ranks for our small messages (created once per default group)."""
    import torch.distributed as dist

    key = dist.group.WORLD
    if key not in _CONTROL:
        if dist.get_backend() == "gloo":
            _CONTROL[key] = None  # the default group is gloo already
        else:
            _CONTROL[key] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_timeout()))
    return _CONTROL[key]


def init_from_env(timeout_s: Optional[float] = None) -> bool:
    """Initialise the default process group from torchrun's environment when there is one of
    more than one process and none is initialised yet (NCCL with CUDA, gloo otherwise).
    Returns whether it did."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        from ...model_device import choose_device

        # NCCL: one rank per GPU, cuda:LOCAL_RANK
        torch.cuda.set_device(choose_device("auto", rank=int(os.environ.get("RANK", "0"))))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s or wait_timeout()))
    return True


# -- collectives ------------------------------------------------------------------------


def _barrier(ctx: Context, step: str, timeout: float) -> None:
    """Wait for every rank at ``step``; name the ranks missing after ``timeout`` seconds."""
    import torch.distributed as dist

    try:
        dist.monitored_barrier(group=ctx.group, timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
    except RuntimeError as exc:
        raise DistributedError(
            f"{ctx}: the other ranks did not all reach '{step}' within {timeout:g} s ({exc}). A rank that hangs, "
            "died or runs other code (another script, other arguments) is named above; run the same command on "
            "every rank, or raise NNSIM_DIST_TIMEOUT / NNSIM_DIST_WAIT (seconds) for slow starts"
        ) from exc


def all_gather(ctx: Context, obj: Any, step: str, timeout: Optional[float] = None) -> List[Any]:
    """``obj`` of every rank, in rank order (after a monitored barrier)."""
    import torch.distributed as dist

    _barrier(ctx, step, wait_timeout() if timeout is None else timeout)
    out: List[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj, group=ctx.group)
    return out


def all_reduce_sum(ctx: Optional[Context], array: np.ndarray) -> np.ndarray:
    """The sum over ranks of a float64 array (itself without a group)."""
    if ctx is None:
        return array
    import torch
    import torch.distributed as dist

    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64).copy())
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ctx.group)
    return t.numpy()


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for key, value in d.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def agree(ctx: Context, summary: Dict[str, Any], what: str, *, data_keys=("samples",)) -> None:
    """Raise on every rank when the ranks' ``summary`` dicts differ (listing each difference
    from rank 0's), after waiting at most NNSIM_DIST_TIMEOUT seconds for them all. A
    :class:`DataError` when a key in ``data_keys`` differs, else an IndexMismatchError."""
    summaries = [_flatten(s) for s in all_gather(ctx, summary, f"checking that every rank runs the same {what}",
                                                   agree_timeout())]
    lines, keys = [], set()
    for rank, other in enumerate(summaries[1:], start=1):
        for key in sorted(set(summaries[0]) | set(other)):
            mine, theirs = summaries[0].get(key, "<missing>"), other.get(key, "<missing>")
            if mine != theirs:
                keys.add(key)
                lines.append(f"{key}: rank 0 has {_short(mine)}, rank {rank} has {_short(theirs)}")
    if lines:
        kind = errors.DataError if keys & set(data_keys) else errors.IndexMismatchError
        raise kind(
            f"{ctx}: the ranks disagree on the {what}:\n  - " + "\n  - ".join(lines)
            + "\nEvery rank must build from the same data (same length and order), the same model weights and the "
            "same attach() and build_index() options (output, layers, sketch_dim, seed, task, use_targets)"
        )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def everywhere(ctx: Optional[Context], step: str, fn: Callable[[], Any], *, timeout: Optional[float] = None) -> Any:
    """Run ``fn`` on every rank and share the outcome: if it raised on any rank, every rank
    raises (the first failure's class when it is one of ours, its message naming each
    failing rank). Without a group, just ``fn()``."""
    if ctx is None:
        return fn()
    failure = None
    result = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
        failure = exc
    statuses = all_gather(ctx, None if failure is None else (type(failure).__name__, str(failure)), step, timeout)
    failed = [(rank, s) for rank, s in enumerate(statuses) if s is not None]
    if not failed:
        return result
    detail = "\n".join(f"  rank {rank}: {name}: {message}" for rank, (name, message) in failed)
    message = f"{step} failed on {len(failed)} of {ctx.world} ranks:\n{detail}"
    cls = getattr(errors, failed[0][1][0], None)
    if not (isinstance(cls, type) and issubclass(cls, NnsimError)):
        cls = DistributedError
    raise cls(message) from failure


def on_main(ctx: Optional[Context], step: str, fn: Callable[[], Any], *, timeout: Optional[float] = None) -> Any:
    """``fn()`` on rank 0 only (the others wait), its failure raised on every rank."""
    if ctx is None:
        return fn()
    return everywhere(ctx, step, fn if ctx.main else (lambda: None), timeout=timeout)


def broadcast(ctx: Optional[Context], obj: Any, step: str) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if ctx is None:
        return obj
    return all_gather(ctx, obj if ctx.main else None, step)[0]
