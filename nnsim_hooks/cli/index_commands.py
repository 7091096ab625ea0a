"""``nnsim index ...``: index folders from the command line, and the torchrun seam of ``nnsim``.

    nnsim index merge PATH [--keep-shards] [--index flat]   # merge shards built with shard=(i, n)

Under torchrun (``torchrun --nproc_per_node=N -m nnsim_hooks.cli.commands audit --data ... --model
...``) :func:`init_distributed` starts the process group from torchrun's environment, so
the ranks share the index builds (see :mod:`nnsim_hooks.index.sharded.build`).
"""

from __future__ import annotations

import argparse

from ..errors import InputError


def add_parser(sub) -> None:
    """Register ``nnsim index`` on the subcommands of the main parser."""
    p = sub.add_parser("index", help="index folders: merge the shards of a build shared by several processes",
                       description="Work on index folders written by build_index.")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION")
    m = isub.add_parser(
        "merge", help="merge the shards of PATH (built with shard=(i, n)) into one index",
        description="Check the shards in PATH/shards (same model fingerprint, sketch recipe and dataset length; "
        "complete; disjoint shares covering every id) and merge them into PATH, an ordinary index folder "
        "(load_index(PATH)). A mismatch is refused with the list of what differs.",
    )
    m.add_argument("path", help="the index folder holding shards/rank-*-of-*")
    m.add_argument("--keep-shards", action="store_true", help="keep the shard folders (features stored twice)")
    m.add_argument("--index", default="flat", help="FAISS index type of the merged index (default %(default)s)")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    m.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    p.set_defaults(index_parser=p, run=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "index_command", None) != "merge":
        args.index_parser.print_help()
        return 2
    from ..index.sharded.shards import merge_shards

    idx = merge_shards(args.path, index=args.index, progress=not args.no_progress, keep_shards=args.keep_shards)
    layout = idx.manifest.get("shards") or {}
    print(f"nnsim index merge: {len(idx):,} samples from {layout.get('count', '?')} shards into {args.path} "
          f"({idx.spec.factory} index)")
    return 0


def init_distributed(args: argparse.Namespace) -> None:
    """Start torch.distributed from torchrun's environment (several processes only)."""
    from ..index.sharded.distributed import current, init_from_env

    init_from_env()
    if current() is not None and getattr(args, "command", None) == "audit" and getattr(args, "data", None) is None:
        raise InputError(
            "the embedded demo (nnsim audit without --data) runs in one process: run it without torchrun, or audit "
            "your own data under torchrun with --data and --model"
        )
