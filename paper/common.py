"""What the reproduction scripts share: the command line, seeding, markdown tables."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--small", action="store_true", help="the seconds-long version CI runs")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the table (.md) and figure (.png)")
    p.add_argument("--seed", type=int, default=0)
    return p


def command_line(module: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command that is running (``module``: the script's ``__name__`` or file stem), as one
    would type it from the repository root."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = module if module.startswith("paper.") else "paper." + Path(module).stem
    return "python -m " + name + ("".join(" " + shlex.quote(str(a)) for a in argv))


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def table(header: Sequence[str], rows: Iterable[Sequence], aligns: str = "") -> str:
    """A markdown table; numbers printed as given (format them before)."""
    rows = [list(map(str, r)) for r in rows]
    aligns = aligns or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in aligns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: Path, name: str, title: str, sections: List[str], started: float, settings: str,
                 argv: Optional[Sequence[str]] = None) -> Path:
    """``out/<name>.md``: title, the command (``python -m paper.<name>`` and ``argv``), settings,
    wall time, then the sections."""
    out.mkdir(parents=True, exist_ok=True)
    text = [f"# {title}", "", f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} {command_line(name, argv)}`", "", f"Settings: {settings}", "",
            f"Wall time: {time.time() - started:.0f} s (2 shared CPU cores, OMP_NUM_THREADS="
            f"{torch.get_num_threads()} torch threads)", ""]
    text += list(sections)
    path = out / f"{name}.md"
    path.write_text("\n".join(text))
    return path
