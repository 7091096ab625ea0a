"""The rank side of tests/test_index_distributed.py, launched by torchrun (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py SCENARIO ROOT

Scenarios (several checks per launch: each torchrun start costs seconds):

- ``kill``: build ROOT/killed; rank 1 kills itself (SIGKILL) in the middle of its share;
- ``main``: resume ROOT/killed; build ROOT/ddp from a DistributedDataParallel-wrapped
  model; sharded queries on it; the refusals (data length, seed, a locked shard, a folder
  of another world size, data without a length); ``nnsim audit`` of ROOT/npy into ROOT/audit.

Each rank writes what it saw to ROOT/<scenario>-rank<R>.npz / .json for the test to check
against its own one-process oracle.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_common import BATCH, DIM, KILL_AT, cli_audit, dataset, make_cnn  # noqa: E402

import nnsim_hooks  # noqa: E402
from nnsim_hooks.index.folder.lock import FolderLock  # noqa: E402
from nnsim_hooks.index.sharded.queries import ShardedQueries  # noqa: E402

class KilledAt(Dataset):
    """``data``, but rank 1 dies (SIGKILL, no cleanup) when it reads sample ``at``."""

    def __init__(self, data, at):
        self.data, self.at = data, at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i == self.at and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.data[i]

def columns(idx):
    return dict(ids=np.asarray(idx.ids), features=np.asarray(idx.features), density=idx.density(),
                n_eff=idx.effective_neighbors(), labels=np.asarray(idx.labels))

def expect_error(fn):
    """``[class name, message]`` of what ``fn`` raised (None if it did not)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return [type(exc).__name__, str(exc)]
    return None

def build(root, name, data=None, model=None, **options):
    model = make_cnn() if model is None else model
    seed = options.pop("seed", 0)
    with nnsim_hooks.attach(model, sketch_dim=DIM, seed=seed) as h:
        return h.build_index(dataset() if data is None else data, root / name, batch_size=BATCH, progress=False,
                             **options)

def scenario_kill(root: Path, rank: int) -> None:
    build(root, "killed", KilledAt(dataset(), KILL_AT))

def scenario_main(root: Path, rank: int) -> None:
    out = {}
    seen = {}
    resumed = build(root, "killed")
    np.savez(root / f"resumed-rank{rank}.npz", **columns(resumed))
    seen["resumed_shards_left"] = (root / "killed" / "shards").exists()

    ddp = torch.nn.parallel.DistributedDataParallel(make_cnn())
    idx = build(root, "ddp", model=ddp)
    np.savez(root / f"ddp-rank{rank}.npz", **columns(idx))

    q = ShardedQueries(idx)
    own_queries = np.asarray(idx.features[rank * 3 : rank * 3 + 2 + rank])  # 2 queries on rank 0, 3 on rank 1
    s, i = q.search(own_queries, 4)
    nb_s, nb_i = q.neighbors(5, batch_size=32)
    dist_, avg = q.consistency(return_average=True)
    out.update(density=q.density(), n_eff_raw=q.effective_neighbors("raw"), n_eff_other=q.effective_neighbors(
        include_self=False), consistency=dist_, average=avg, counts=q.neighbor_counts(0.3, include_self=False),
        soft=q.soft_counts(2), search_scores=s, search_ids=i, search_queries=own_queries, nb_scores=nb_s, nb_ids=nb_i)
    np.savez(root / f"queries-rank{rank}.npz", **out)

    # refusals: every rank must raise, none may hang
    short = TensorDataset(*dataset().tensors) if rank == 0 else TensorDataset(*[t[:150] for t in dataset().tensors])
    seen["length"] = expect_error(lambda: build(root, "length", data=short))
    seen["seed"] = expect_error(lambda: build(root, "seed", seed=rank))
    lock = FolderLock(root / "locked" / "shards" / "rank-00001-of-00002", "test: another writer")
    if rank == 0:
        lock.acquire()
    seen["locked"] = expect_error(lambda: build(root, "locked", data=Subset(dataset(), range(8))))
    if rank == 0:
        lock.release()
    seen["world"] = expect_error(lambda: build(root, "world3"))
    seen["otherdata"] = expect_error(lambda: build(root, "otherdata"))  # a finished index of other data, same length
    seen["iterable"] = expect_error(lambda: build(root, "iterable", data=[dataset().tensors]))
    one = build(root, "one", data=Subset(dataset(), range(1)))  # rank 1's share is empty
    seen["one_sample_ids"] = np.asarray(one.ids).tolist()
    seen["one_sample_labels"] = np.asarray(one.labels).tolist()
    seen["merged_again"] = np.asarray(build(root, "ddp").ids).tolist() == list(range(len(dataset())))

    seen["audit_rc"] = cli_audit(root / "npy", root / "audit")

    # last (the group is left out of step): rank 1 never calls build_index; rank 0 must not hang
    if rank == 0:
        os.environ["NNSIM_DIST_TIMEOUT"] = "3"
        seen["absent"] = expect_error(lambda: build(root, "absent"))
    else:
        time.sleep(8)
    with open(root / f"main-rank{rank}.json", "w") as f:
        json.dump(seen, f)

def main() -> None:
    scenario, root = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        {"kill": scenario_kill, "main": scenario_main}[scenario](root, dist.get_rank())
    finally:
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
