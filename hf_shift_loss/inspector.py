"""See what the loss trains on: masked and trained tokens of a dataset, in the terminal and in HTML.

Every example goes through the same :class:`~hf_shift_loss.collator.PromptMaskingCollator` encoding as
training (prompt/completion, chat messages, pre-tokenized), so what is shown is what is trained.

- terminal (rich): trained tokens on a green background, masked tokens dim; alternating shades make
  token boundaries visible; a newline is shown as ``⏎``.
- statistics: examples, tokens, trained tokens and their ratio, truncation, examples with nothing to
  train, and a length histogram.
- an HTML report with the same view and the histogram (PNG, base64, inline): one self-contained file.

Used by ``hf-shift-loss inspect`` (see :mod:`hf_shift_loss.cli`) and from Python::

    report = inspect_dataset(tokenizer, examples, num_examples=3, html_path="report.html", max_length=2048)
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import track
from rich.table import Table
from rich.text import Text

IGNORE_INDEX = -100
# Trained tokens: green, two shades alternating; masked: dim grey, two shades alternating.
TRAINED_STYLES = ("black on #7ee787", "black on #3fb950")
MASKED_STYLES = ("grey62", "grey42")
NEWLINE_MARK = "⏎"
TAB_MARK = "⇥"
PROGRESS_MIN_EXAMPLES = 200  # below this a progress bar only flickers

__all__ = [
    "InspectionReport",
    "inspect_dataset",
    "load_examples",
    "load_tokenizer",
    "token_pieces",
]


@dataclass
class InspectionReport:
    """Statistics of a dataset as the collator encodes it.

    ``trained_tokens`` counts the loss's targets: positions ``t >= 1`` whose label is not ``-100``
    (position 0 has no previous token, so the shifted loss never trains it).
    """

    examples: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    trained_ratio: float = 0.0
    truncated_examples: int = 0
    truncated_tokens: int = 0
    dropped_turns: int = 0
    examples_with_dropped_turns: int = 0
    untrained_examples: int = 0
    failed_examples: int = 0
    errors: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    max_length: int | None = None
    html_path: str | None = None

    def length_histogram(self, bins: int = 20) -> dict[str, list[float]]:
        """Counts of example lengths in ``bins`` equal-width bins (edges included)."""
        if not self.lengths:
            return {"bin_edges": [], "counts": []}
        low, high = min(self.lengths), max(self.lengths)
        width = max(1.0, (high - low) / bins)
        counts = [0] * bins
        for length in self.lengths:
            counts[min(bins - 1, int((length - low) / width))] += 1
        return {"bin_edges": [low + i * width for i in range(bins + 1)], "counts": counts}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready statistics (per-example lengths summarized, not listed)."""
        stats = asdict(self)
        lengths = stats.pop("lengths")
        stats["min_length"] = min(lengths) if lengths else 0
        stats["mean_length"] = sum(lengths) / len(lengths) if lengths else 0.0
        stats["max_length_seen"] = max(lengths) if lengths else 0
        stats["length_histogram"] = self.length_histogram()
        return stats


# ---------------------------------------------------------------------------------------- loading
def load_tokenizer(spec: str, *, chat_template: str | None = None) -> Any:
    """A tokenizer from a local directory, a hub id, or a ``.gguf`` file.

    Args:
        spec: directory / hub id (``AutoTokenizer.from_pretrained``) or a path to a GGUF file, loaded as
            ``from_pretrained(its folder, gguf_file=its name)``.
        chat_template: a Jinja chat template, or a path to a file holding one, replacing the tokenizer's.
    """
    from transformers import AutoTokenizer

    if spec.endswith(".gguf") and os.path.isfile(spec):
        folder, name = os.path.split(os.path.abspath(spec))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    if chat_template is not None:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as file:
                chat_template = file.read()
        tokenizer.chat_template = chat_template
    return tokenizer


def load_examples(source: str, *, split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """Examples from a ``.jsonl`` / ``.json`` / ``.parquet`` file or a ``datasets`` hub name.

    JSON files are read as plain Python objects (not through Arrow), so messages keep exactly the keys
    they have; Arrow would add every key seen anywhere as ``None``, which some chat templates render.
    """
    lower = source.lower()
    if os.path.isfile(source) and lower.endswith((".jsonl", ".ndjson")):
        examples = []
        with open(source, encoding="utf-8") as file:
            for line_number, line in enumerate(file, start=1):
                if line.strip():
                    try:
                        examples.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{source}, line {line_number}: not valid JSON ({error})") from None
                if limit is not None and len(examples) >= limit:
                    break
        return examples
    if os.path.isfile(source) and lower.endswith(".json"):
        with open(source, encoding="utf-8") as file:
            data = json.load(file)
        if isinstance(data, Mapping) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}
        if not isinstance(data, list):
            raise ValueError(f"{source}: expected a JSON list of examples, got {type(data).__name__}")
        return data[:limit] if limit is not None else data
    import datasets

    if os.path.isfile(source) and lower.endswith(".parquet"):
        dataset = datasets.Dataset.from_parquet(source)
    else:
        dataset = datasets.load_dataset(source, split=split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.to_list()


# ---------------------------------------------------------------------------------------- rendering
def token_pieces(tokenizer: Any, input_ids: Sequence[int]) -> list[tuple[int, int, str]]:
    """The text of each token as ``(first token, end token, text)`` groups, in order.

    Each token's text is ``decode(context + token)`` minus ``decode(context)`` (a few tokens of context),
    so SentencePiece's word-initial spaces survive. Tokens holding part of one UTF-8 character (byte-level
    BPE splits Chinese and emoji) are grouped until the character is complete.
    """

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces: list[tuple[int, int, str]] = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        context = input_ids[max(0, start - 4) : start]
        before, after = decode(context), decode(list(context) + list(input_ids[start:end]))
        text = after[len(before) :] if after.startswith(before) else decode(input_ids[start:end])
        if text.endswith("\ufffd") and end < len(input_ids) and end - start < 4:
            continue  # an incomplete character: wait for its remaining bytes
        pieces.append((start, end, text))
        start = end
    return pieces


def _visible(text: str) -> str:
    return text.replace("\t", TAB_MARK).replace("\n", NEWLINE_MARK + "\n")


def render_text(
    tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], *, plain: bool = False
) -> Text:
    """A rich Text of one example: trained tokens on green, masked ones dim, boundaries by shade.

    ``plain`` (a terminal without colour, a log file): trained runs are wrapped in ``⟦ ⟧`` and tokens are
    separated by ``|``, so the view survives as plain text.
    """
    text = Text()
    previous_trained = False
    for n, (start, end, piece) in enumerate(token_pieces(tokenizer, input_ids)):
        trained = any(label != IGNORE_INDEX for label in labels[start:end])
        if plain:
            opening = "⟦" if trained and not previous_trained else ""
            closing = "⟧" if previous_trained and not trained else ""
            separator = "" if n == 0 or opening or closing or text.plain.endswith("\n") else "|"
            text.append(closing + separator + opening + _visible(piece))
        else:
            text.append(_visible(piece), style=(TRAINED_STYLES if trained else MASKED_STYLES)[n % 2])
        previous_trained = trained
    if plain and previous_trained:
        text.append("⟧")
    return text


def render_html_tokens(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """The same view as :func:`render_text` as HTML spans (hover shows position, id and label)."""
    spans = []
    for n, (start, end, piece) in enumerate(token_pieces(tokenizer, input_ids)):
        trained = any(label != IGNORE_INDEX for label in labels[start:end])
        css_class = ("t" if trained else "m") + str(n % 2)
        title = f"position {start}, id {list(input_ids[start:end])}, label {list(labels[start:end])}"
        body = (
            html.escape(piece)
            .replace("\t", TAB_MARK)
            .replace("\n", f'<span class="nl">{NEWLINE_MARK}</span>\n')
        )
        spans.append(f'<span class="{css_class}" title="{html.escape(title)}">{body}</span>')
    return "".join(spans)


def statistics_table(report: InspectionReport) -> Table:
    table = Table(title="Dataset statistics", show_header=False, title_justify="left")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for name, value in _statistics_rows(report):
        table.add_row(name, value)
    return table


def _statistics_rows(report: InspectionReport) -> list[tuple[str, str]]:
    stats = report.to_dict()
    rows = [
        ("examples", f"{report.examples:,}"),
        ("formats", ", ".join(f"{name}: {count:,}" for name, count in sorted(report.formats.items()))),
        ("total tokens", f"{report.total_tokens:,}"),
        ("trained tokens", f"{report.trained_tokens:,} ({report.trained_ratio:.1%})"),
        (
            "length min / mean / max",
            f"{stats['min_length']} / {stats['mean_length']:.1f} / {stats['max_length_seen']}",
        ),
        ("max_length", str(report.max_length)),
        ("examples truncated", f"{report.truncated_examples:,}"),
        ("tokens truncated", f"{report.truncated_tokens:,}"),
        (
            "examples with dropped turns",
            f"{report.examples_with_dropped_turns:,} ({report.dropped_turns:,} turns)",
        ),
        ("examples with no trained token", f"{report.untrained_examples:,}"),
    ]
    if report.failed_examples:
        rows.append(("examples that failed to encode", f"{report.failed_examples:,}"))
    return rows


def length_histogram_png(report: InspectionReport) -> bytes | None:
    """A PNG histogram of example lengths (matplotlib, Agg), or None without matplotlib or data."""
    if not report.lengths:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    axes.hist(report.lengths, bins=min(40, max(1, len(set(report.lengths)))), color="#3fb950")
    if report.max_length is not None:
        axes.axvline(
            report.max_length, color="#d1242f", linestyle="--", label=f"max_length={report.max_length}"
        )
        axes.legend()
    axes.set_xlabel("tokens per example (after truncation)")
    axes.set_ylabel("examples")
    axes.set_title(f"{report.examples:,} examples, {report.trained_ratio:.1%} of tokens trained")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #1f2328; }
.example { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-all;
           border: 1px solid #d0d7de; border-radius: 6px; padding: 0.8em; line-height: 1.5; }
.t0 { background: #7ee787; } .t1 { background: #3fb950; }
.m0 { color: #6e7781; } .m1 { color: #6e7781; background: #eaeef2; }
.nl { opacity: 0.6; }
table { border-collapse: collapse; } td { padding: 0.2em 1em; border-bottom: 1px solid #d0d7de; }
td:last-child { text-align: right; font-variant-numeric: tabular-nums; }
.legend span { padding: 0.1em 0.4em; }
"""


def write_html(
    path: str, report: InspectionReport, shown: list[tuple[int, str, dict[str, Any]]], png: bytes | None
) -> None:
    """One self-contained HTML file: statistics, the histogram (inline PNG) and the shown examples."""
    rows = "".join(
        f'<tr><td>{html.escape(name)}</td><td class="stat" data-name="{html.escape(name)}">{html.escape(value)}</td></tr>'
        for name, value in _statistics_rows(report)
    )
    image = (
        f'<img id="length-histogram" alt="length histogram" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        if png
        else ""
    )
    examples = "".join(
        f"<h3>Example {index} <small>({len(encoded['input_ids'])} tokens, "
        f"{_trained_targets(encoded['labels'])} trained, {encoded.get('truncated_tokens', 0)} truncated)</small></h3>"
        f'<div class="example" data-index="{index}">{body}</div>'
        for index, body, encoded in shown
    )
    errors = "".join(f"<li>{html.escape(error)}</li>" for error in report.errors)
    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>hf-shift-loss inspect</title>
<style>{HTML_STYLE}</style></head><body>
<h1>What the loss trains on</h1>
<p class="legend"><span class="t0">trained</span> <span class="t1">token</span> <span class="m0">masked</span>
<span class="m1">token</span> &nbsp; {NEWLINE_MARK} newline; hover a token for its position, id and label</p>
<h2>Statistics</h2><table id="statistics">{rows}</table>
<script type="application/json" id="statistics-json">{html.escape(json.dumps(report.to_dict()))}</script>
{image}
{"<h2>Errors</h2><ul>" + errors + "</ul>" if errors else ""}
<h2>Examples</h2>{examples}
</body></html>
"""
    with open(path, "w", encoding="utf-8") as file:
        file.write(document)


# ---------------------------------------------------------------------------------------- inspection
def _trained_targets(labels: Sequence[int]) -> int:
    # The loss pairs logits[t] with labels[t + 1]: labels[0] is never a target.
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def _format_of(example: Any) -> str:
    if isinstance(example, Mapping):
        if example.get("input_ids") is not None:
            return "pretokenized"
        if example.get("messages") is not None:
            return "messages"
        if "prompt" in example and "completion" in example:
            return "prompt_completion"
    return "unknown"


def inspect_dataset(
    tokenizer: Any,
    examples: Iterable[Mapping[str, Any]],
    *,
    num_examples: int = 3,
    html_path: str | None = None,
    console: Console | None = None,
    show_progress: bool | None = None,
    max_errors_kept: int = 5,
    **collator_kwargs: Any,
) -> InspectionReport:
    """Encode every example as training would, print ``num_examples`` of them and the statistics.

    Args:
        tokenizer: the training tokenizer.
        examples: dicts in any format of :class:`~hf_shift_loss.collator.PromptMaskingCollator`
            (a list, a ``datasets.Dataset``, ...).
        num_examples: how many examples (the first ones) to show token by token.
        html_path: where to write the self-contained HTML report (None: no report).
        console: where to print (default: a rich Console on stdout).
        show_progress: a progress bar; default on for datasets of 200 examples or more.
        collator_kwargs: ``PromptMaskingCollator`` options: max_length, mask_prompt, train_roles,
            train_end_of_turn, last_turn_only, chat_template_kwargs, ...

    Returns:
        The :class:`InspectionReport`. An example that fails to encode is counted and its error kept
        (the first ``max_errors_kept``), not raised: finding such examples is what inspection is for.
    """
    from hf_shift_loss.collator import PromptMaskingCollator

    console = console or Console()
    collator = PromptMaskingCollator(tokenizer, **collator_kwargs)
    report = InspectionReport(max_length=collator_kwargs.get("max_length"), html_path=html_path)
    examples = examples if isinstance(examples, Sequence) or hasattr(examples, "__len__") else list(examples)
    total = len(examples)
    if show_progress is None:
        show_progress = total >= PROGRESS_MIN_EXAMPLES
    formats: Counter[str] = Counter()
    shown: list[tuple[int, str, dict[str, Any]]] = []
    iterator = track(
        enumerate(examples),
        total=total,
        description="encoding",
        console=console,
        disable=not show_progress,
        transient=True,
    )
    for index, example in iterator:
        report.examples += 1
        formats[_format_of(example)] += 1
        try:
            encoded = collator.encode(example, index=index)
        except ValueError as error:
            report.failed_examples += 1
            if len(report.errors) < max_errors_kept:
                report.errors.append(str(error))
            continue
        input_ids, labels = encoded["input_ids"], encoded["labels"]
        trained = _trained_targets(labels)
        report.total_tokens += len(input_ids)
        report.trained_tokens += trained
        report.lengths.append(len(input_ids))
        report.truncated_tokens += int(encoded.get("truncated_tokens", 0))
        report.truncated_examples += int(encoded.get("truncated_tokens", 0) > 0)
        report.dropped_turns += int(encoded.get("dropped_turns", 0))
        report.examples_with_dropped_turns += int(encoded.get("dropped_turns", 0) > 0)
        report.untrained_examples += int(trained == 0)
        if len(shown) < num_examples:
            shown.append((index, "", encoded))
    report.formats = dict(formats)
    report.trained_ratio = report.trained_tokens / report.total_tokens if report.total_tokens else 0.0

    # Without colour (a pipe, a log, NO_COLOR) mark trained tokens with brackets instead.
    plain = console.color_system is None or console.no_color
    for index, _, encoded in shown:
        header = (
            f"Example {index}: {len(encoded['input_ids'])} tokens, {_trained_targets(encoded['labels'])} trained, "
            f"{encoded.get('truncated_tokens', 0)} truncated, {encoded.get('dropped_turns', 0)} turns dropped"
        )
        console.rule(header, align="left")
        console.print(
            render_text(tokenizer, encoded["input_ids"], encoded["labels"], plain=plain), highlight=False
        )
    if plain:
        legend = Text(f"legend: ⟦trained|tokens⟧ masked|tokens  {NEWLINE_MARK} newline")
    else:
        legend = Text("legend: ")
        legend.append("trained", style=TRAINED_STYLES[0]).append("token", style=TRAINED_STYLES[1]).append(
            "  "
        )
        legend.append("masked", style=MASKED_STYLES[0]).append("token", style=MASKED_STYLES[1])
        legend.append(f"  {NEWLINE_MARK} newline")
    console.print(legend)
    console.print(statistics_table(report))
    for error in report.errors:
        console.print(Text(f"error: {error}", style="red"))

    if html_path is not None:
        rendered = [
            (index, render_html_tokens(tokenizer, encoded["input_ids"], encoded["labels"]), encoded)
            for index, _, encoded in shown
        ]
        write_html(html_path, report, rendered, length_histogram_png(report))
        console.print(f"HTML report: {html_path}")
    return report
