"""The ``nnsim`` command line: :mod:`.commands` (``nnsim audit``, the entry point) and
:mod:`.index_commands` (``nnsim index ...``)."""

from .commands import main

__all__ = ["main"]
