"""docs/architecture.md's table of rooms is the rule the package's imports follow.

The allowed edges are read from the page (one table, so the page and this test cannot drift); the
imports are read from the source with ``ast`` (module level and inside functions, absolute and
relative), so a lazy import against the direction fails too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hf_shift_loss"
PAGE = REPO / "docs" / "architecture.md"
NOTHING = "—"


def parse_rooms(markdown: str) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """``(modules, may_import)`` by room, from the table whose header starts with ``| Room |``.

    ``modules``: the room's paths relative to ``hf_shift_loss/`` (``data/`` is a folder, ``cli.py`` a
    file); ``may_import``: the rooms its modules may import (``—``: none).
    """
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\|\s*Room\s*\|", line))
    modules: dict[str, list[str]] = {}
    may_import: dict[str, set[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        room, paths, _job, allowed = (cell.strip() for cell in line.strip().strip("|").split("|"))
        assert room not in modules, f"room {room!r} listed twice"
        modules[room] = re.findall(r"`([^`]+)`", paths)
        may_import[room] = set() if allowed == NOTHING else set(re.findall(r"`([^`]+)`", allowed))
    return modules, may_import


def parse_sketch(markdown: str) -> dict[str, set[str]]:
    """The ``room ──► a, b`` lines of the page's sketch, constants left implicit as the sketch says."""
    edges = {}
    for room, targets in re.findall(r"^(\w+)(?: \([^)]*\))?\s+──►\s+(.+)$", markdown, flags=re.MULTILINE):
        targets = re.sub(r"\s{2,}\(.*\)$", "", targets.strip())  # a comment after two spaces
        if targets == "every room below":
            edges[room] = {"*"}
        else:
            edges[room] = set() if targets == "nothing" else set(targets.split(", "))
    return edges


def room_of(module: str, modules: dict[str, list[str]]) -> str | None:
    """The room of ``module`` (a path relative to ``hf_shift_loss/``, e.g. ``loss/fused.py``)."""
    rooms = [
        room
        for room, paths in modules.items()
        for path in paths
        if (module.startswith(path) if path.endswith("/") else module == path)
    ]
    assert len(rooms) <= 1, f"{module} is in several rooms: {rooms}"
    return rooms[0] if rooms else None


def room_of_import(dotted: str, modules: dict[str, list[str]]) -> str | None:
    """The room an imported ``hf_shift_loss.x.y`` belongs to (None: not this package).

    A name that is no module of a room (``from hf_shift_loss import IGNORE_INDEX``) is the package root's.
    """
    parts = dotted.split(".")
    if parts[0] != "hf_shift_loss":
        return None
    path = "/".join(parts[1:])
    rooms = [room_of(candidate, modules) for candidate in (f"{path}.py", f"{path}/__init__.py")]
    return next((room for room in rooms if room is not None), room_of("__init__.py", modules))


def imports_of(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import in ``source``; relative imports resolved from ``module``."""
    package = ["hf_shift_loss", *module.split("/")[:-1]]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, *([node.module] if node.module else [])])
            if node.module in (None, "hf_shift_loss"):  # ``from hf_shift_loss import data, IGNORE_INDEX``
                found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, name))
    return found


def violations(
    sources: dict[str, str], modules: dict[str, list[str]], may_import: dict[str, set[str]]
) -> list[str]:
    """Every module without a room, and every import against the table, as readable lines."""
    problems = []
    for module, source in sorted(sources.items()):
        room = room_of(module, modules)
        if room is None:
            problems.append(f"hf_shift_loss/{module} is in no room of docs/architecture.md: add it")
            continue
        for line, dotted in imports_of(source, module):
            target = room_of_import(dotted, modules)
            if target is None or target == room:
                continue
            if target not in may_import[room]:
                problems.append(
                    f"hf_shift_loss/{module}:{line} ({room}) imports {dotted} ({target}); "
                    f"{room} may import only {sorted(may_import[room]) or 'nothing'} (docs/architecture.md)"
                )
    return problems


def package_sources() -> dict[str, str]:
    return {
        path.relative_to(PACKAGE).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


@pytest.fixture(scope="module")
def rooms() -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    return parse_rooms(PAGE.read_text(encoding="utf-8"))


def test_every_module_is_in_a_room_and_imports_follow_the_table(rooms):
    modules, may_import = rooms
    assert not violations(package_sources(), modules, may_import)


def test_the_table_names_known_rooms_and_every_room_has_modules(rooms):
    modules, may_import = rooms
    assert {"constants", "data", "loss", "trainer", "config", "collator", "inspector", "cli"} <= set(modules)
    for room, allowed in may_import.items():
        assert allowed <= set(modules) - {room}, f"{room} may import unknown rooms {allowed - set(modules)}"
        assert "package" not in allowed, "no room may import the package root"
    sources = package_sources()
    for room in modules:
        assert any(room_of(module, modules) == room for module in sources), f"room {room} has no module"
    assert may_import["constants"] == set()
    assert "data" not in may_import["loss"] and "loss" not in may_import["data"]
    for side in ("data", "loss"):
        assert may_import[side] == {"constants"}


def test_the_sketch_says_what_the_table_says(rooms):
    modules, may_import = rooms
    sketch = parse_sketch(PAGE.read_text(encoding="utf-8"))
    assert sketch.keys() == modules.keys()
    for room, targets in sketch.items():
        if targets == {"*"}:
            assert may_import[room] == set(modules) - {room}, room
        elif room == "constants":
            assert targets == may_import[room] == set()
        else:  # every other room may import constants, as the sketch says once
            assert targets | {"constants"} == may_import[room], room


def test_the_inspector_rule_holds_for_a_module_or_a_package(rooms):
    modules, _ = rooms
    assert room_of("inspector.py", modules) == room_of("inspector/views.py", modules) == "inspector"
    assert room_of_import("hf_shift_loss.inspector.report", modules) == "inspector"


def test_imports_against_the_direction_are_reported(rooms):
    """Controls: each kind of wrong import is caught (lazy, relative, through the package root)."""
    modules, may_import = rooms
    wrong = {
        "data/pack.py": "def f():\n    from hf_shift_loss.trainer import ShiftLossTrainer\n",
        "loss/eager.py": "from ..data import encode\n",
        "loss/fused.py": "import hf_shift_loss.data.pack as pack\n",
        "constants.py": "from hf_shift_loss import IGNORE_INDEX\n",
        "inspector/views.py": "from hf_shift_loss.cli import main\n",
        "newroom.py": "x = 1\n",
    }
    problems = violations(wrong, modules, may_import)
    assert len(problems) == len(wrong), problems
    assert any("data/pack.py:2 (data) imports hf_shift_loss.trainer (trainer)" in p for p in problems)
    assert any("loss/eager.py:1 (loss) imports hf_shift_loss.data (data)" in p for p in problems)
    assert any(
        "constants.py:1 (constants) imports hf_shift_loss.IGNORE_INDEX (package)" in p for p in problems
    )
    assert any("newroom.py is in no room" in p for p in problems)
    allowed = {"loss/paths.py": "from hf_shift_loss.constants import IGNORE_INDEX\nfrom . import heads\n"}
    assert violations(allowed, modules, may_import) == []
