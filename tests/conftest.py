"""Shared set-up for the test suite: deterministic, small, two threads.

Helpers for the core tests (independent oracles, comparisons, model snapshots) live in
``tests/core_oracles.py``; this file only holds fixtures every test file may use.
"""

from __future__ import annotations

import warnings

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state and leaves the rule table as it found it."""
    torch.manual_seed(0)
    from nnsim_hooks.rules import RULES

    before = dict(RULES)
    yield
    if RULES != before:
        RULES.clear()
        RULES.update(before)
        warnings.warn("a test changed the rule registry without cleaning up; it was restored", stacklevel=1)

