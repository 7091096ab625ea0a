"""The README's quick start (examples/quickstart.py, the same code) runs as written."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_runs(capsys):
    scope = runpy.run_path(str(EXAMPLE), run_name="__main__")
    printed = capsys.readouterr().out
    assert "modules on fast rules" in printed and "conv1" in printed
    assert scope["grads"]["conv1.weight"].shape == (8, 64, 3, 7, 7)
    sims, feats = scope["sims"], scope["feats"]
    assert sims.shape == (8, 8) and feats.shape == (8, 1024)
    torch.testing.assert_close(sims.diagonal(), torch.ones(8, dtype=sims.dtype))
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(8))
    assert not scope["h"].attached


def test_readme_quick_start_is_the_example():
    """The README shows the same code, so the two cannot drift apart."""
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    code = EXAMPLE.read_text().split('"""', 2)[2].strip()
    assert f"```python\n{code}\n```" in readme
