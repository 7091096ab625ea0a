"""Where the shards of an index folder live on disk: ``PATH/shards/rank-IIIII-of-NNNNN/``.

Only the names: reading a folder (:mod:`.persist`) needs to recognise a folder of shards
not merged yet, and the sharded build and merge (:mod:`nnsim_hooks.index.sharded`) write
and read them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Tuple

SHARDS_DIR = "shards"
_NAME = re.compile(r"^rank-(\d{5})-of-(\d{5})$")


def shard_name(i: int, n: int) -> str:
    return f"rank-{i:05d}-of-{n:05d}"


def shard_folder(path: Path, i: int, n: int) -> Path:
    return Path(path) / SHARDS_DIR / shard_name(i, n)


def list_shards(path: Path) -> List[Tuple[Path, int, int]]:
    """``(folder, i, n)`` for every ``shards/rank-*-of-*`` folder of ``path``, sorted."""
    root = Path(path) / SHARDS_DIR
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir()):
        m = _NAME.match(entry.name)
        if m and entry.is_dir():
            out.append((entry, int(m.group(1)), int(m.group(2))))
    return out


def has_shards(path: Path) -> bool:
    return bool(list_shards(path))
