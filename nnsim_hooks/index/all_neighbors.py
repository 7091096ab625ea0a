"""The audit's neighbour step: the ``k`` nearest stored rows of every stored row.

Two methods, both dense torch matrix products (several times faster than FAISS's flat
scan on CPU) over the memory-mapped features, a block at a time:

- ``"exact"``: every query block against every stored block, O(N^2 D);
- ``"partition"``: a spherical k-means splits the rows into ``nlist`` lists; each row is
  searched in the ``nprobe`` lists whose centres are nearest to it, exactly (no quantised
  codes: the scores are the stored features' own). The work is list-major: a list's rows
  are read once and scored against every query that probes it, O(N nprobe N/nlist D).

``nprobe`` is chosen for a target recall@k measured, not assumed: a held-out sample of rows
is searched exactly, half of it tunes ``nprobe`` (the smallest whose recall reaches the
target) and the other half measures the recall of the finished step. Recall counts a
returned neighbour as found when its similarity reaches the exact k-th one (ties with the
true neighbours count). Where the chosen ``nprobe`` would cost nearly an exact search, the
exact one runs.

The step is resumable: with ``state_dir``, its plan (method, centres, nprobe) and the
running neighbour lists are saved every ``checkpoint_seconds`` at a block boundary, and a
new call with the same arguments continues there, giving the same neighbours as an
uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..atomic import write_bytes_atomic, write_text_atomic
from ..errors import InputError, StoreError
from ..safe_files import is_link, make_folder, remove_empty_folder, remove_file, remove_owned

logger = logging.getLogger(__name__)

DEFAULT_RECALL = 0.95
#: Valid rows up to which the exact search runs without trying a partition.
EXACT_UP_TO = 20_000
#: Held-out rows searched exactly: half tune nprobe, half measure the recall.
SAMPLE_ROWS = 500
#: nprobe values tried, smallest first.
NPROBE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Partition search is used only when it scores less than this share of all pairs (its
#: gathers and merges cost more per pair than the exact search's).
PARTITION_WORTH = 0.3
#: Nearest centres of every row kept from the tuning pass (a chosen nprobe up to this
#: reuses them instead of a second pass).
KEPT_PROBES = 16
#: Lists per sqrt(N) rows: more, smaller lists than FAISS's sqrt(N) rule of thumb, so that a
#: row's neighbours fall in few lists (see benchmarks/results/scale_cpu.md).
LISTS_PER_ROOT = 4
KMEANS_ITERATIONS = 8
KMEANS_POINTS_PER_LIST = 40
#: The smallest block of rows the step works on.
MIN_BLOCK = 256
MAX_BLOCK = 8192
DEFAULT_MEMORY = 1 << 30
_NEG = float("-inf")


def partition_lists(n: int) -> int:
    """Lists of the partition for ``n`` valid rows: 4·sqrt(n), at most n / 8."""
    return max(2, min(n // 8, int(round(LISTS_PER_ROOT * math.sqrt(n)))))


def check_recall(recall: Any) -> float:
    """A recall target in (0, 1]."""
    if isinstance(recall, bool) or not isinstance(recall, (int, float, np.floating)) or not 0 < float(recall) <= 1:
        raise InputError(f"recall must be a number in (0, 1] (1: exact search), got {recall!r}")
    return float(recall)


def block_rows(dim: int, budget: int) -> int:
    """Rows per block so that a query block, a stored block and their scores fit ``budget`` bytes."""
    def need(b: int) -> int:
        return 4 * (b * b + 2 * b * dim) + 24 * b * 64

    if need(MIN_BLOCK) > budget:
        raise InputError(
            f"a memory budget of {budget:,} bytes is below what one block of the neighbour search needs "
            f"({need(MIN_BLOCK):,} bytes for {MIN_BLOCK} rows of dimension {dim}); give at least that"
        )
    b = MIN_BLOCK
    while b * 2 <= MAX_BLOCK and need(b * 2) <= budget:
        b *= 2
    return b


@dataclass
class NeighborPlan:
    """How the step runs, and what it measured (the audit's ``summary["neighbors"]``)."""

    method: str
    k: int
    rows: int
    dim: int
    recall_target: float
    nlist: int = 0
    nprobe: int = 0
    tuning: Dict[str, float] = field(default_factory=dict)
    recall_measured: Optional[float] = None
    recall_sample: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class _Rows:
    """The valid rows of a memory-mapped ``[N, D]`` array, gathered a block at a time."""

    def __init__(self, features: np.ndarray, valid: np.ndarray):
        self.features = features
        self.ids = np.flatnonzero(np.asarray(valid, dtype=bool)).astype(np.int64)
        self.contiguous = len(self.ids) == len(features)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, positions: np.ndarray) -> torch.Tensor:
        """Rows at sorted valid-row ``positions``, as a float32 tensor (a copy)."""
        rows = self.ids[positions]
        if len(rows) == 0:
            return torch.zeros((0, self.features.shape[1]))
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows):
            block = self.features[lo:hi]
        elif hi - lo <= 4 * len(rows):  # dense enough: one sequential read
            block = np.asarray(self.features[lo:hi])[rows - lo]
        else:
            block = self.features[rows]
        return torch.from_numpy(np.array(block, dtype=np.float32, order="C", copy=True))

    def span(self, start: int, end: int) -> torch.Tensor:
        return self.take(np.arange(start, end))


def _merge(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, cols: torch.Tensor, k: int):
    """The top ``k`` of the running lists and a new score block (``cols``: its columns' row ids)."""
    kk = min(k, s.shape[1])
    top_s, top = torch.topk(s, kk, dim=1)
    cat_s = torch.cat([best_s, top_s], 1)
    cat_i = torch.cat([best_i, cols[top]], 1)
    keep_s, keep = torch.topk(cat_s, k, dim=1)
    return keep_s, cat_i.gather(1, keep)


def _exact_block(rows: _Rows, q_pos: np.ndarray, k: int, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` (valid-row positions) of the rows at ``q_pos``, themselves excluded."""
    q = rows.take(q_pos)
    own = torch.from_numpy(q_pos)
    best_s = torch.full((len(q), k), _NEG)
    best_i = torch.full((len(q), k), -1, dtype=torch.int64)
    for start in range(0, len(rows), block):
        end = min(len(rows), start + block)
        s = q @ rows.span(start, end).T
        inside = (own >= start) & (own < end)
        if bool(inside.any()):
            r = inside.nonzero().flatten()
            s[r, own[r] - start] = _NEG
        best_s, best_i = _merge(best_s, best_i, s, torch.arange(start, end), k)
    return best_s, best_i


# -- the partition ---------------------------------------------------------------------------


def kmeans(rows: _Rows, nlist: int, seed: int, block: int) -> torch.Tensor:
    """Spherical k-means centres ``[nlist, D]`` (unit rows) from a sample of the rows."""
    rng = np.random.default_rng(seed)
    n = len(rows)
    sample = np.sort(rng.choice(n, size=min(n, KMEANS_POINTS_PER_LIST * nlist), replace=False))
    x = rows.take(sample)
    centres = x[torch.from_numpy(np.sort(rng.choice(len(x), size=nlist, replace=False)))].clone()
    for _ in range(KMEANS_ITERATIONS):
        assign = torch.cat([(x[a : a + block] @ centres.T).argmax(1) for a in range(0, len(x), block)])
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        norms = sums.norm(dim=1, keepdim=True)
        filled = norms.squeeze(1) > 0
        centres[filled] = sums[filled] / norms[filled]  # an empty list keeps its old centre
    return centres


def probe_lists(rows: _Rows, centres: torch.Tensor, nprobe: int, block: int, bar=None) -> np.ndarray:
    """The ``nprobe`` nearest centres of every row ``[n, nprobe]`` (int32, nearest first)."""
    out = np.empty((len(rows), nprobe), dtype=np.int32)
    for start in range(0, len(rows), block):
        end = min(len(rows), start + block)
        out[start:end] = torch.topk(rows.span(start, end) @ centres.T, nprobe, dim=1).indices.numpy()
        if bar is not None:
            bar.update(end - start)
    return out


def tune_nprobe(rows: _Rows, centres: torch.Tensor, sample: np.ndarray, tune: np.ndarray, k: int, block: int,
                steps: List[int], bar=None):
    """For the rows at ``sample``: their exact top-``k`` scores ``[S, k]`` and, for the
    ``tune`` ones among them (positions in ``sample``) and each ``nprobe`` of ``steps``,
    their top-``k`` scores when searching only that many lists. Also the nearest
    :data:`KEPT_PROBES` centres of every row (nearest first: its list)."""
    q = rows.take(sample)
    tune_t = torch.from_numpy(tune)
    own = torch.from_numpy(sample)
    qt = q[tune_t]
    rank = torch.empty((len(qt), len(centres)), dtype=torch.int64)
    order = torch.argsort(qt @ centres.T, dim=1, descending=True)
    rank.scatter_(1, order, torch.arange(len(centres)).expand(len(qt), -1).contiguous())
    exact = torch.full((len(q), k), _NEG)
    approx = {p: torch.full((len(qt), k), _NEG) for p in steps}
    dummy = torch.full((len(q), k), -1, dtype=torch.int64)
    kept = min(KEPT_PROBES, len(centres))
    probes = np.empty((len(rows), kept), dtype=np.int32)
    for start in range(0, len(rows), block):
        end = min(len(rows), start + block)
        db = rows.span(start, end)
        probes[start:end] = torch.topk(db @ centres.T, kept, dim=1).indices.numpy()
        s = q @ db.T
        inside = (own >= start) & (own < end)
        if bool(inside.any()):
            r = inside.nonzero().flatten()
            s[r, own[r] - start] = _NEG
        cols = torch.arange(start, end)
        exact, _ = _merge(exact, dummy, s, cols, k)
        r = rank[:, torch.from_numpy(probes[start:end, 0]).long()]
        st = s[tune_t]
        for p in steps:
            approx[p], _ = _merge(approx[p], dummy[: len(qt)], st.masked_fill(r >= p, _NEG), cols, k)
        if bar is not None:
            bar.update(end - start)
    return exact, approx, probes


def recall_of(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of the found similarities ``[S, k]`` that reach each row's exact k-th one (ties count)."""
    kth = exact[:, -1:]
    hit = (found >= kth - 1e-6) & torch.isfinite(found)
    ok = torch.isfinite(kth).squeeze(1)
    if not bool(ok.any()):
        return 1.0
    return float(hit[ok].float().mean())


# -- the step --------------------------------------------------------------------------------


class _State:
    """The running neighbour lists and how far the step got, saved at block boundaries."""

    def __init__(self, folder: Optional[Path], plan: NeighborPlan, n: int, k: int):
        self.folder, self.plan = folder, plan
        self.best_s = torch.full((n, k), _NEG)
        self.best_i = torch.full((n, k), -1, dtype=torch.int64)
        self.done = 0
        self.saved_at = time.time()

    def restore(self) -> bool:
        if self.folder is None or not (self.folder / "progress.npz").is_file():
            return False
        with np.load(self.folder / "progress.npz") as z:
            if z["best_s"].shape != tuple(self.best_s.shape):
                return False
            self.best_s, self.best_i = torch.from_numpy(z["best_s"]), torch.from_numpy(z["best_i"])
            self.done = int(z["done"])
        logger.info("resuming the neighbour step at block %d", self.done)
        return True

    def save(self, every: float, force: bool = False) -> None:
        if self.folder is None or not (force or time.time() - self.saved_at >= every):
            return
        write_bytes_atomic(self.folder / "progress.npz", _npz(best_s=self.best_s.numpy(), best_i=self.best_i.numpy(),
                                                              done=np.int64(self.done)))
        self.saved_at = time.time()


#: the files of the neighbour step's progress folder (all of them the step's own)
STATE_FILES = ("progress.npz", "plan.json", "centres.npy", "lists.npy")


def remove_state(folder: Path) -> None:
    """Delete the progress folder of a finished neighbour step (its own files only, never through a link)."""
    if not folder.is_dir() or is_link(folder):
        return
    remove_owned(folder, lambda name: name in STATE_FILES or name.startswith("."), skip_links=True)
    remove_empty_folder(folder)


def _npy(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _plan_file(folder: Path) -> Path:
    return folder / "plan.json"


def _load_plan(folder: Optional[Path], key: Dict[str, Any]):
    """The plan and centres saved by an earlier, interrupted call with the same ``key``."""
    if folder is None or not _plan_file(folder).is_file():
        return None
    try:
        saved = json.loads(_plan_file(folder).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("key") != key:
        return None
    plan = NeighborPlan(**saved["plan"])
    centres = torch.from_numpy(np.load(folder / "centres.npy")) if plan.method == "partition" else None
    lists = np.load(folder / "lists.npy") if plan.method == "partition" else None
    return plan, centres, lists, saved.get("sample_exact")


def _save_plan(folder: Optional[Path], key, plan: NeighborPlan, centres, lists, sample_exact) -> None:
    if folder is None:
        return
    try:
        make_folder(folder)
        remove_file(folder / "progress.npz")
        if centres is not None:
            write_bytes_atomic(folder / "centres.npy", _npy(centres.numpy()))
            write_bytes_atomic(folder / "lists.npy", _npy(lists))
        write_text_atomic(_plan_file(folder), json.dumps({"key": key, "plan": plan.to_dict(),
                                                          "sample_exact": sample_exact}))
    except OSError as exc:
        raise StoreError(f"cannot write the neighbour step's progress to '{folder}': {exc}") from exc


def all_neighbors(features: np.ndarray, valid: np.ndarray, k: int, *, recall: float = DEFAULT_RECALL,
                  exact: Optional[bool] = None, max_memory: Optional[int] = None, progress: bool = True,
                  state_dir=None, checkpoint_seconds: float = 60.0, seed: int = 0,
                  _stop_after: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, NeighborPlan]:
    """``(sims float32 [N, k], ids int64 [N, k], plan)``: the ``k`` most similar other valid
    rows of every valid row of ``features`` (unit rows), best first; ``(NaN, -1)`` where
    there is none (rows not ``valid``, fewer than ``k`` others).

    ``recall``: the target recall@k in (0, 1]; 1 or ``exact=True``: exact search.
    ``exact=None`` (default): exact for small N, else the partition search, unless its
    measured nprobe makes it nearly as costly. ``max_memory``: bytes for one block of work
    (default 1 GiB; below one block is an :class:`~nnsim_hooks.errors.InputError`).
    ``state_dir``: a folder to save progress in (resumable). ``_stop_after``: tests only,
    raise KeyboardInterrupt after that many blocks.
    """
    from tqdm.auto import tqdm

    recall = check_recall(recall)
    if exact is not None and not isinstance(exact, bool):
        raise InputError(f"exact must be True, False or None, got {exact!r}")
    n_all, dim = features.shape
    budget = DEFAULT_MEMORY if max_memory is None else int(max_memory)
    block = block_rows(dim, budget)
    rows = _Rows(features, valid)
    n = len(rows)
    kk = max(0, min(int(k), n - 1))
    folder = Path(state_dir) if state_dir is not None else None
    key = {"rows": n_all, "valid": n, "dim": dim, "k": kk, "recall": recall, "exact": exact, "seed": seed}
    started = time.time()
    if kk == 0:
        plan = NeighborPlan("exact", int(k), n_all, dim, recall, recall_measured=1.0)
        return np.full((n_all, k), np.nan, np.float32), np.full((n_all, k), -1, np.int64), plan

    resumed = _load_plan(folder, key)
    if resumed is not None:
        plan, centres, lists, sample_exact = resumed
    else:
        plan, centres, lists, sample_exact = _make_plan(rows, kk, recall, exact, block, seed, progress, n_all, dim)
        _save_plan(folder, key, plan, centres, lists, sample_exact)
    plan.seconds["plan"] = round(time.time() - started, 2)

    state = _State(folder, plan, n, kk)
    state.restore()
    t0 = time.time()
    if plan.method == "exact":
        units = [(a, min(n, a + block)) for a in range(0, n, block)]
        bar = tqdm(total=n, initial=sum(b - a for a, b in units[: state.done]), desc="neighbours (exact)",
                   unit="row", disable=not progress, leave=False)
        for u in range(state.done, len(units)):
            a, b = units[u]
            state.best_s[a:b], state.best_i[a:b] = _exact_block(rows, np.arange(a, b), kk, block)
            state.done = u + 1
            bar.update(b - a)
            state.save(checkpoint_seconds)
            if _stop_after is not None and state.done >= _stop_after:
                state.save(0, force=True)
                raise KeyboardInterrupt
        bar.close()
    else:
        _partition_search(rows, centres, lists, plan, state, kk, block, progress, checkpoint_seconds, _stop_after)
    plan.seconds["search"] = round(time.time() - t0, 2)

    if sample_exact is not None and plan.method == "partition":
        measure = np.asarray(sample_exact["rows"], dtype=np.int64)
        plan.recall_measured = round(recall_of(state.best_s[measure], torch.tensor(sample_exact["scores"])), 4)
        plan.recall_sample = len(measure)
        if plan.recall_measured < recall:
            logger.warning("the neighbour step's recall@%d measured on %d held-out rows is %.3f, below the target %.3f",
                           kk, len(measure), plan.recall_measured, recall)
    else:
        plan.recall_measured, plan.recall_sample = 1.0, 0

    sims = np.full((n_all, k), np.nan, dtype=np.float32)
    ids = np.full((n_all, k), -1, dtype=np.int64)
    best_s, best_i = state.best_s.numpy(), state.best_i.numpy()
    found = np.isfinite(best_s) & (best_i >= 0)
    sims[rows.ids, :kk] = np.where(found, best_s, np.nan)
    ids[rows.ids, :kk] = np.where(found, rows.ids[np.clip(best_i, 0, None)], -1)
    plan.seconds["total"] = round(time.time() - started, 2)
    return sims, ids, plan


def _make_plan(rows: _Rows, k: int, recall: float, exact: Optional[bool], block: int, seed: int, progress: bool,
               n_all: int, dim: int):
    """Exact or partition, and the partition's centres, lists and nprobe (measured on a sample)."""
    from tqdm.auto import tqdm

    n = len(rows)
    plan = NeighborPlan("exact", k, n_all, dim, recall)
    if exact or recall >= 1.0 or (exact is None and n <= EXACT_UP_TO):
        return plan, None, None, None
    t = time.time()
    nlist = partition_lists(n)
    centres = kmeans(rows, nlist, seed, block)
    plan.seconds["kmeans"] = round(time.time() - t, 2)
    rng = np.random.default_rng(seed + 1)
    sample = np.sort(rng.choice(n, size=min(n, SAMPLE_ROWS), replace=False))
    steps = [p for p in NPROBE_STEPS if p < nlist]
    tune, measure = np.arange(0, len(sample), 2), np.arange(1, len(sample), 2)
    bar = tqdm(total=n, desc="neighbours: measuring recall", unit="row", disable=not progress, leave=False)
    t = time.time()
    exact_s, approx, probes = tune_nprobe(rows, centres, sample, tune, k, block, steps, bar)
    bar.close()
    lists = probes[:, 0]
    plan.seconds["tuning"] = round(time.time() - t, 2)
    plan.tuning = {str(p): round(recall_of(approx[p], exact_s[tune]), 4) for p in steps}
    chosen = next((p for p in steps if plan.tuning[str(p)] >= recall), None)
    sizes = np.bincount(lists, minlength=nlist)
    if chosen is not None:
        # a row meets nprobe lists of about (sum of squared sizes / n) rows each
        cost = n * chosen * float((sizes.astype(np.float64) ** 2).sum()) / n
        if cost < PARTITION_WORTH * float(n) * n:
            plan.method, plan.nlist, plan.nprobe = "partition", nlist, chosen
            sample_exact = {"rows": sample[measure].tolist(), "scores": exact_s[measure].tolist()}
            return plan, centres, probes if chosen <= probes.shape[1] else lists, sample_exact
    logger.info("the partition needs nprobe %s of %d lists for recall %.2f: searching exactly", chosen, nlist, recall)
    return plan, None, None, None


def _partition_search(rows: _Rows, centres, lists, plan: NeighborPlan, state: _State, k: int, block: int,
                      progress: bool, checkpoint_seconds: float, stop_after: Optional[int]) -> None:
    """List-major search: each list's rows scored against every row that probes it."""
    from tqdm.auto import tqdm

    n, nprobe, nlist = len(rows), plan.nprobe, plan.nlist
    if lists.ndim == 2 and lists.shape[1] >= nprobe:  # the tuning pass kept them
        probes, lists = np.ascontiguousarray(lists[:, :nprobe]), lists[:, 0]
    else:
        lists = lists[:, 0] if lists.ndim == 2 else lists
        bar = tqdm(total=n, desc="neighbours: nearest lists", unit="row", disable=not progress, leave=False)
        probes = probe_lists(rows, centres, nprobe, block, bar)
        bar.close()
    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")
    askers = (order // nprobe).astype(np.int64)  # rows, grouped by the list they probe, ascending
    bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=nlist))])
    members_order = np.argsort(lists, kind="stable")
    member_bounds = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=nlist))])
    done_rows = int(bounds[state.done]) if state.done else 0
    bar = tqdm(total=len(flat), initial=done_rows, desc=f"neighbours (nprobe {nprobe} of {nlist} lists)",
               unit="row", unit_scale=1 / nprobe, disable=not progress, leave=False)
    for lst in range(state.done, nlist):
        members = members_order[member_bounds[lst] : member_bounds[lst + 1]]
        queries = askers[bounds[lst] : bounds[lst + 1]]
        if len(members) and len(queries):
            db = rows.take(members)
            cols = torch.from_numpy(members)
            step = max(1, (block * block) // max(1, len(members)))
            for a in range(0, len(queries), step):
                q_pos = queries[a : a + step]
                s = rows.take(q_pos) @ db.T
                # a row is a member of its own list: not its own neighbour
                at = np.searchsorted(members, q_pos)
                mine = (at < len(members)) & (members[np.minimum(at, len(members) - 1)] == q_pos)
                if mine.any():
                    r = np.flatnonzero(mine)
                    s[torch.from_numpy(r), torch.from_numpy(at[r])] = _NEG
                qt = torch.from_numpy(q_pos)
                state.best_s[qt], state.best_i[qt] = _merge(state.best_s[qt], state.best_i[qt], s, cols, k)
        state.done = lst + 1
        bar.update(len(queries))
        state.save(checkpoint_seconds)
        if stop_after is not None and state.done >= stop_after:
            state.save(0, force=True)
            raise KeyboardInterrupt
    bar.close()
