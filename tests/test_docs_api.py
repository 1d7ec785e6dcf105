"""docs/api.md documents exactly the public names, and importing the package stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import hf_shift_loss

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def documented_names(markdown: str) -> set[str]:
    """The names of the ``## `name` `` sections (level-2 headings that are one backticked name)."""
    return set(re.findall(r"^## `([A-Za-z_][A-Za-z0-9_]*)`\s*$", markdown, flags=re.MULTILINE))


def test_documented_names_parse_only_backticked_level_2_headings():
    page = "## `a`\n### `b`\n## Beyond `c`\n## `d`  \ntext ## `e`\n"
    assert documented_names(page) == {"a", "d"}


def test_api_page_sections_are_exactly_the_public_names():
    names = documented_names(API_PAGE.read_text(encoding="utf-8"))
    public = set(hf_shift_loss.__all__)
    assert names == public, (
        f"docs/api.md sections without a public name: {sorted(names - public)}; "
        f"public names without a section: {sorted(public - names)}"
    )


def test_every_public_name_resolves():
    for name in hf_shift_loss.__all__:
        assert getattr(hf_shift_loss, name) is not None


def test_import_does_not_load_the_inspector_dependencies():
    code = (
        "import sys, hf_shift_loss\n"
        "heavy = sorted(m for m in ('rich', 'matplotlib') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"import hf_shift_loss imported {result.stdout.strip()}"
