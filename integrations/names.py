"""Close-name suggestions for unknown model names."""

from __future__ import annotations

import difflib
from typing import Iterable, List


def close_names(name: str, candidates: Iterable[str], n: int = 5) -> List[str]:
    """Up to ``n`` candidates close to ``name`` (case-insensitive), best first."""
    candidates = list(candidates)
    lower = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5)
    # Names that contain the query (resnet -> resnet18, resnet34...) help when the edit
    # distance does not.
    contains = [c for c in candidates if name.lower() in c.lower() and c.lower() not in found]
    out = [lower[f] for f in found] + sorted(contains, key=len)
    return out[:n]


def unknown_name_message(kind: str, name: str, candidates: Iterable[str], listing: str) -> str:
    close = close_names(name, candidates)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown {kind} model '{name}': {hint}{listing}"
