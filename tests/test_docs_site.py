"""The documentation site builds with ``mkdocs build --strict``, and its API reference is exactly the public API.

mkdocs.yml sets ``strict: true`` and warns on every omitted page, broken link or anchor, so a page left
out of the navigation, a link to a missing file or heading, or a docstring reference that mkdocstrings
cannot resolve fails the build, and this test.
"""

from __future__ import annotations

import configparser
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hf_shift_loss

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "reference.md"
LOWER_BOUNDS = REPO / "constraints" / "lower-bounds.txt"


def mkdocs() -> str:
    executable = Path(sys.executable).parent / "mkdocs"
    if not executable.exists():
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]'")
    return str(executable)


def reference_targets(markdown: str) -> list[str]:
    """The objects of the ``::: dotted.path`` lines (mkdocstrings' autodoc blocks), in page order."""
    return re.findall(r"^:::[ \t]+([A-Za-z_][\w.]*)[ \t]*$", markdown, flags=re.MULTILINE)


def test_reference_targets_parse_only_autodoc_lines():
    page = "::: a.b\n  ::: c\ntext ::: d\n:::e.f\n::: g.h  \n    options: {}\n"
    assert reference_targets(page) == ["a.b", "g.h"]


def test_reference_documents_exactly_the_public_names():
    targets = reference_targets(REFERENCE.read_text(encoding="utf-8"))
    names = [target.rsplit(".", 1)[-1] for target in targets]
    assert len(names) == len(set(names)), f"docs/reference.md documents a name twice: {sorted(names)}"
    public = set(hf_shift_loss.__all__)
    assert set(names) == public, (
        f"docs/reference.md targets without a public name: {sorted(set(names) - public)}; "
        f"public names without a target: {sorted(public - set(names))}"
    )
    for target in targets:
        module_name, name = target.rsplit(".", 1)
        # Each target is the public object itself (hf_shift_loss.X, or the module that defines it).
        assert getattr(importlib.import_module(module_name), name) is getattr(hf_shift_loss, name), target


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [mkdocs(), "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (site / "reference" / "index.html").read_text(encoding="utf-8")
    for target in reference_targets(REFERENCE.read_text(encoding="utf-8")):
        assert f'id="{target}"' in reference, f"the built reference has no entry for {target}"
    # Doctest lines outside an "Examples:" section are Markdown text, where ">>>" starts a quote.
    assert "<blockquote>" not in reference, "a docstring example renders as a quote: put it under 'Examples:'"


def test_lower_bounds_are_the_tested_pins():
    """setup.cfg's lower bounds are exactly constraints/lower-bounds.txt (what check-lower-bounds.sh tests),
    and docs/install.md states each of them."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg", encoding="utf-8")
    requires = setup["options"]["install_requires"].split()
    claimed = dict(
        re.fullmatch(r"([\w-]+)>=([\d.]+)(?:,<[\d.]+)?", r).groups() for r in requires if ">=" in r
    )
    pins = re.findall(
        r"^([\w-]+)==([\d.]+)\s*$", LOWER_BOUNDS.read_text(encoding="utf-8"), flags=re.MULTILINE
    )
    assert {name: version.removesuffix(".0") for name, version in pins} == claimed
    install_page = (REPO / "docs" / "install.md").read_text(encoding="utf-8")
    for name, version in pins:
        assert re.search(
            rf"^\| {name} \| >= {re.escape(claimed[name])}\b.*\| {re.escape(version)} \|", install_page, re.M
        ), name
