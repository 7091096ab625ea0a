"""How many samples fit in one pass of the audit: a batch's peak memory, measured before
the first pass, against a memory budget.

Why measured and not counted: a pass's peak is the model's activations plus what the
capture keeps (per-output backward passes, per-layer per-sample gradients, the sketch
buffers), and which of these coexist depends on the model, the layer rules, the output
mode and the allocator. Counting them analytically would re-derive the engine in a
second place and miss what it does not know (timm's attention caches, cuDNN
workspaces). Measuring the real pass is exact for what it measures, so the audit runs
the very pass it will run (same model, same output, same sketch) on 1 sample and on a
8 (:data:`PROBE_BATCH`), and extrapolates linearly: ``peak(B) = fixed + B * per_sample``. The memory of
a pass grows linearly in its batch size (activations and per-sample gradients are
``[B, ...]`` tensors), which :mod:`tests.test_audit_memory` checks against an actual
large pass.

How a pass's peak is read:

- **GPU**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, above
  what was allocated before the pass;
- **CPU (Linux)**: the process's resident-memory high-water mark ``VmHWM``, reset before
  the pass (``/proc/self/clear_refs``), above the resident memory before it (freed heap
  memory is handed back first, ``malloc_trim``, so that reused memory is not missed);
- elsewhere: no measurement; the batch size is kept and a debug line says so.

The budget is ``max_memory`` (bytes, or text such as ``"8GB"``), by default
:data:`DEFAULT_SHARE` of the memory available now: ``MemAvailable`` of ``/proc/meminfo``
on the CPU, the free memory of the GPU.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

from ..errors import InputError

logger = logging.getLogger(__name__)

#: Share of the available memory the audit's passes may use by default: the rest is left
#: to the index, the data loading and the rest of the machine.
DEFAULT_SHARE = 0.7
#: Sample counts of the probe passes: 1, then this many (when the dataset and the
#: requested batch have them, and the budget allows; else 2): far enough apart that the
#: slope is not the allocator's noise (a pass of 1 sample is often a little cheaper per
#: sample than larger ones, so the line through 1 and 2 would overestimate large batches).
PROBE_BATCH = 8

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}

MemoryBudget = Union[None, int, float, str]


def parse_memory(value: MemoryBudget, where: str = "max_memory") -> Optional[int]:
    """Bytes from an int, a float, or text: ``"8GB"``, ``"8g"``, ``"512MiB"``, ``"1.5 G"``
    (K, M, G, T are powers of 1024, with or without ``B``/``iB``). None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"{where} must be a memory size such as 8GB or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        number, scale = float(value), 1
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(value))
        if match is None:
            raise InputError(f"{where} {value!r} is not a memory size: write e.g. 8GB, 512MB, 1.5G or a number of "
                             "bytes")
        number, scale = float(match.group(1)), _UNITS[match.group(2).lower()]
    total = int(number * scale)
    if total <= 0:
        raise InputError(f"{where} must be positive, got {value!r}")
    return total


def format_bytes(n: float) -> str:
    """``12.5 GB`` (powers of 1024, as :func:`parse_memory` reads them)."""
    for unit, scale in (("TB", 1024 ** 4), ("GB", 1024 ** 3), ("MB", 1024 ** 2), ("KB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def available_memory(device: torch.device) -> Optional[Tuple[int, str]]:
    """``(bytes, where)``: the free memory of the GPU, or ``MemAvailable`` on the CPU;
    None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM (MemAvailable)"
    except OSError:
        pass
    return None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc), so that a pass reusing it shows."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes ``fn()`` needs at its peak above what was in use before it (see the module
    docstring); None when this platform cannot tell."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    try:
        _release_freed_memory()
        base = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
    except OSError:
        return None
    fn()
    return max(0, (_status_kb("VmHWM") - base) * 1024)


@dataclass(frozen=True)
class BatchMemory:
    """``peak(B) = fixed + B * per_sample`` bytes for a pass of B samples."""

    fixed: int
    per_sample: int
    measured: Tuple[Tuple[int, int], ...]  # (batch size, peak bytes) of the probe passes

    def at(self, batch_size: int) -> int:
        return self.fixed + batch_size * self.per_sample

    @classmethod
    def from_probes(cls, probes) -> "BatchMemory":
        """The line through the probes (batch size, bytes); one probe: all of it per sample
        (the cautious reading)."""
        (b1, p1), *rest = sorted(probes)
        if not rest:
            return cls(0, max(1, p1 // b1), tuple(probes))
        b2, p2 = rest[-1]
        per_sample = max(1, (p2 - p1) // (b2 - b1))
        return cls(max(0, p1 - b1 * per_sample), per_sample, tuple(probes))


def measure_batch_memory(run: Callable[[int], object], device: torch.device, largest: int,
                         budget: Optional[int] = None) -> Optional[BatchMemory]:
    """Probe passes ``run(b)`` at 1 sample (after one warm-up pass, which makes the
    lazily built buffers) and at :data:`PROBE_BATCH` samples (``largest`` at most; 2 when
    twice the extrapolated peak of that probe would not fit ``budget``, so that a probe
    never risks what it guards against). None when peaks cannot be measured here."""
    run(1)  # warm-up: sketch matrices, cuDNN plans... belong to the baseline, not to a batch
    one = measure_peak(lambda: run(1), device)
    if one is None:
        return None
    probes = [(1, one)]
    more = min(PROBE_BATCH, largest)
    if budget is not None and 2 * more * max(one, 1) > budget:
        more = min(2, largest)
    if more > 1 and (budget is None or more * max(one, 1) <= budget):
        # measured once, on purpose: a first pass at a new size also makes buffers that stay
        # (allocator pools, BLAS workspaces); the audit's own first pass pays them too
        peak = measure_peak(lambda: run(more), device)
        if peak is not None:
            probes.append((more, peak))
    return BatchMemory.from_probes(probes)


def choose_batch_size(memory: BatchMemory, requested: int, budget: int, budget_source: str) -> int:
    """The largest batch size up to ``requested`` whose estimated peak fits ``budget``;
    an :class:`~nnsim_hooks.errors.InputError` with the numbers when one sample does not."""
    one = memory.at(1)
    if one > budget:
        raise InputError(
            f"one sample needs about {format_bytes(one)} per pass of the audit (measured), more than its memory "
            f"budget of {format_bytes(budget)} ({budget_source}). Give it at least {format_bytes(one * 1.2)} with "
            "--max-memory (max_memory=) if the machine has it, or make a pass lighter: --output contrast (one "
            "backward pass instead of one per class), a smaller --image-size / --spatial-size, a smaller model, "
            "or a GPU"
        )
    fits = (budget - memory.fixed) // memory.per_sample
    return int(max(1, min(requested, fits)))


def budget_for(max_memory: MemoryBudget, device: torch.device) -> Optional[Tuple[int, str]]:
    """``(bytes, where it comes from)``: ``max_memory``, else :data:`DEFAULT_SHARE` of
    the available memory; None when neither is known."""
    given = parse_memory(max_memory)
    if given is not None:
        return given, "max_memory" if not isinstance(max_memory, str) else f"--max-memory {max_memory}"
    available = available_memory(device)
    if available is None:
        return None
    free, where = available
    return int(free * DEFAULT_SHARE), f"{DEFAULT_SHARE:.0%} of the {format_bytes(free)} {where}"


def fit_batch_size(run: Callable[[int], object], device: torch.device, requested: int, n_samples: int,
                   max_memory: MemoryBudget = None) -> int:
    """The batch size for the audit's passes (see the module docstring); logs the choice."""
    budget = budget_for(max_memory, device)
    if budget is None:
        logger.debug("no memory budget known on this platform: batch size %d kept", requested)
        return requested
    limit, source = budget
    largest = max(1, min(requested, n_samples))
    memory = measure_batch_memory(run, device, largest, limit)
    if memory is None:
        logger.debug("peak memory cannot be measured on this platform: batch size %d kept", requested)
        return requested
    chosen = choose_batch_size(memory, largest, limit, source)
    words = (f"a pass needs about {format_bytes(memory.fixed)} + {format_bytes(memory.per_sample)} per sample "
             f"(measured); budget {format_bytes(limit)} ({source})")
    if chosen < largest:
        logger.warning("batch size %d -> %d so that a pass fits in memory: %d samples would need about %s; %s",
                       requested, chosen, largest, format_bytes(memory.at(largest)), words)
    else:
        logger.info("batch size %d fits in memory (about %s); %s", chosen, format_bytes(memory.at(chosen)), words)
    return chosen if chosen < largest else requested
