"""Code in the docs runs as written."""

from __future__ import annotations

import pathlib
import re

DOCS = pathlib.Path(__file__).parents[1] / "docs"


def test_adding_a_modality_example_runs():
    text = (DOCS / "adding-a-modality.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(code.strip().splitlines()) < 100  # the promise of the guide
    exec(compile(code, "adding-a-modality.md", "exec"), {"__name__": "docs_example"})
