"""Every code block in the docs runs as pasted or says it is a fragment.

``pycon`` blocks (``>>>``) run as doctests (pytest's ``--doctest-glob='*.md'``). A ``python`` block
must open with a ``# fragment: ...`` comment saying what it needs, except the README's example, which
CI checks to equal ``examples/readme_example.py`` and runs.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_python_blocks_run_or_say_they_are_fragments(page):
    blocks = BLOCK.findall(page.read_text())
    if page.name == "README.md":
        readme_example = (ROOT / "examples" / "readme_example.py").read_text()
        assert blocks and blocks[0].strip() in readme_example  # CI runs it, see .ci/run
        blocks = blocks[1:]
    unmarked = [b.splitlines()[0] for b in blocks if not b.startswith("# fragment")]
    assert not unmarked, f"{page.name}: python blocks neither tested nor marked '# fragment': {unmarked}"
