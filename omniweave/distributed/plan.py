"""Plans are data: module/parameter names matched by globs.

In a glob, ``*`` stands for exactly one dotted name component
(``model.layers.*`` matches ``model.layers.3`` but not ``model.layers.3.mlp``).
"""

from __future__ import annotations

import re
from functools import cache


@cache
def _pattern(glob: str) -> re.Pattern:
    return re.compile(
        "\\.".join("[^.]+" if part == "*" else re.escape(part) for part in glob.split("."))
    )


def matches(name: str, glob: str) -> bool:
    """Whether the dotted ``name`` matches ``glob`` component by component."""
    return _pattern(glob).fullmatch(name) is not None
