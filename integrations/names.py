"""Close-name suggestions for unknown model names."""

from __future__ import annotations

import difflib
from typing import Iterable, List


def close_names(name: str, candidates: Iterable[str], n: int = 5) -> List[str]:
    """Up to ``n`` candidates close to ``name`` (case-insensitive), best first."""
    candidates = list(candidates)
    # Names that differ only in case (MONAI's DenseNet121, Densenet121, densenet121) count
    # once, spelled as close to the query's case as possible.
    lower = {}
    for c in candidates:
        best = lower.get(c.lower())
        if best is None or _case_score(c, name) > _case_score(best, name):
            lower[c.lower()] = c
    found = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5)
    # Names that contain the query (resnet -> resnet18, resnet34...) help when the edit
    # distance does not.
    contains = [c for c in lower.values() if name.lower() in c.lower() and c.lower() not in found]
    out = [lower[f] for f in found] + sorted(contains, key=len)
    return out[:n]


def _case_score(candidate: str, query: str) -> int:
    return sum(a == b for a, b in zip(candidate, query))


def unknown_name_message(kind: str, name: str, candidates: Iterable[str], listing: str) -> str:
    close = close_names(name, candidates)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown {kind} model '{name}': {hint}{listing}"
