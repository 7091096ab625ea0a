"""A griffe extension for the API page: the docstrings' Sphinx roles as code.

The package's docstrings cross-reference with Sphinx roles (``:meth:`similarity```,
``:class:`~nnsim_hooks.index.GradientIndex```), which Markdown would print as they are.
Links would need fully qualified targets everywhere (an unresolved one fails the strict
build), so each role becomes a code span of what Sphinx would show; ``::`` before a
literal block becomes ``:``, the block itself being indented code in Markdown too.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")
LITERAL_BLOCK = re.compile(r"(?<=\S)::\n")


def _shown(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is not None:
            docstring.value = LITERAL_BLOCK.sub(":\n", ROLE.sub(_shown, docstring.value))
