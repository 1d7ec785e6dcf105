"""docs/datasets.md cannot drift: every row it shows is encoded and every result it states is checked.

The page's ```` ```json ```` blocks are example rows, or results of the row above them (blocks with a
``"trained"`` key: the decoded runs of tokens whose label is not -100, and with ``"max_length"`` what is
``"kept"`` and the counts); its ```` ```text ```` blocks holding ``ValueError: ...`` are the errors of
the row above them. Its pictures are what docs/examples/make_format_pictures.py makes of those rows.
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
from chat_tokenizers import smollm2_tokenizer

from hf_shift_loss.data import Encoder, detect_format
from hf_shift_loss.loss import IGNORE_INDEX

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(REPO, "docs", "datasets.md")
EXAMPLES = os.path.join(REPO, "docs", "examples")
_BLOCK = re.compile(r"```(json|text)\n(.*?)```", re.S)
_COUNTS = ("truncated_tokens", "truncated_completion", "dropped_turns")


def page_blocks() -> list[tuple[dict, str, object]]:
    """``(row, kind, claim)`` for every result and error block of the page, with the row it is about."""
    with open(PAGE, encoding="utf-8") as file:
        text = file.read()
    checks, row = [], None
    for kind, body in _BLOCK.findall(text):
        if kind == "json":
            block = json.loads(body)
            if "trained" in block:
                checks.append((row, "result", block))
            else:
                row = block
        elif body.startswith("ValueError: "):
            checks.append((row, "error", body.strip()))
    return checks


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    runs, run = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [decode(tokenizer, ids) for ids in runs + ([run] if run else [])]


CHECKS = page_blocks()


def test_the_page_shows_every_format():
    formats = {detect_format(list(row)) for row, kind, _ in CHECKS if kind == "result"}
    assert formats == {"text", "prompt_completion", "messages", "tokenized"}
    conversational = [row for row, kind, _ in CHECKS if isinstance(row.get("completion"), list)]
    assert conversational, "the conversational prompt/completion row is missing"
    assert sum(kind == "error" for _, kind, _ in CHECKS) == 2


@pytest.mark.parametrize("row, kind, claim", CHECKS, ids=[f"{i}-{c[1]}" for i, c in enumerate(CHECKS)])
def test_page_claim(row, kind, claim):
    tokenizer = smollm2_tokenizer()
    if kind == "error":
        with pytest.raises(ValueError) as raised:
            if claim.startswith("ValueError: row "):
                Encoder(tokenizer)(row, 0)
            else:
                detect_format(list(row))
        assert f"ValueError: {raised.value}" == claim
        return
    encoded = Encoder(tokenizer, max_length=claim.get("max_length"))(row)
    assert trained_runs(tokenizer, encoded["input_ids"], encoded["labels"]) == claim["trained"]
    if "kept" in claim:
        assert decode(tokenizer, encoded["input_ids"]) == claim["kept"]
    for count in _COUNTS:
        if count in claim:
            assert encoded[count] == claim[count], count


def test_pictures_are_the_pages_rows():
    """Every picture exists and is what the generator makes of the row above it now."""
    sys.path.insert(0, EXAMPLES)
    try:
        import make_format_pictures
    finally:
        sys.path.remove(EXAMPLES)
    rows = make_format_pictures.pictured_rows(PAGE)
    assert set(rows) == {"text", "prompt-completion", "conversational", "messages", "tokenized"}
    for name, row in rows.items():
        path = os.path.join(REPO, "docs", "img", f"format-{name}.svg")
        assert os.path.isfile(path), f"{path} is missing: run python docs/examples/make_format_pictures.py"
        with open(path, encoding="utf-8") as file:
            stale = file.read() != make_format_pictures.render(smollm2_tokenizer(), name, row)
        assert not stale, f"{path} is stale: run python docs/examples/make_format_pictures.py"
