"""``python -m nnsim_hooks.cli``."""

import sys

from .commands import main

sys.exit(main())
