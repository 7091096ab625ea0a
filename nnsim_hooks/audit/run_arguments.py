"""Checks of the audit's arguments shared by ``audit(model, dataset)`` and
``audit(index=...)``: the optional dependencies, and ``k`` against the samples there are."""

from __future__ import annotations


def require_audit_extra() -> None:
    """The audit's optional dependencies, with one message naming the extra."""
    from ..optional import require_all

    require_all(("pandas", "matplotlib", "sklearn", "scipy", "PIL"), "the audit", "audit")


def usable_k(k: int, n_valid: int) -> int:
    """``k`` clamped to the number of neighbours a sample can have (``n_valid - 1``), with a
    warning: a larger k pads every row with missing neighbours, which shifts the label
    vote, the outlier scores and every threshold derived from them. (Below two samples
    nobody has neighbours and every score is NaN anyway: k becomes 1, silently.)"""
    most = max(1, n_valid - 1)
    if k > most and n_valid >= 2:
        import warnings

        warnings.warn(
            f"nnsim_hooks.audit: k={k} is more than the {most} neighbours a sample can have ({n_valid} samples with a "
            f"gradient); using k={most}. Pass a smaller --k for small datasets",
            RuntimeWarning,
            stacklevel=3,
        )
        return most
    return min(k, most)
