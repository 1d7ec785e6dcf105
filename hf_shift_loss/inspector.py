"""See what the loss trains on: masked and trained tokens of a dataset, in the terminal and in HTML.

Every example goes through the same :class:`~hf_shift_loss.data.encode.Encoder` as training (text,
prompt/completion, conversational prompt/completion, chat messages, pre-tokenized), so what is shown is
what is trained, and the counts are the training's :class:`~hf_shift_loss.data.stats.DataStats`.

- terminal (rich): trained tokens on a green background, masked tokens dim; alternating shades make
  token boundaries visible; a newline is shown as ``⏎``.
- statistics: examples, tokens, trained tokens and their ratio, truncation, examples with nothing to
  train, examples that fail to encode (with their errors), and a length histogram.
- an HTML report with the same view and the histogram (PNG, base64, inline): one self-contained file.

Used by ``hf-shift-loss inspect`` (see :mod:`hf_shift_loss.cli`) and from Python::

    report = inspect_dataset(tokenizer, dataset, num_examples=3, html_path="report.html", max_length=2048)
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import track
from rich.table import Table
from rich.text import Text

try:  # a chat template's raise_exception(...) raises a jinja2 TemplateError (jinja2 comes with transformers)
    from jinja2.exceptions import TemplateError
except ImportError:  # pragma: no cover
    TemplateError = ValueError  # type: ignore[assignment,misc]

from hf_shift_loss.data.encode import Encoder, detect_format
from hf_shift_loss.data.stats import DataStats
from hf_shift_loss.loss import IGNORE_INDEX

# Trained tokens: green, two shades alternating; masked: dim grey, two shades alternating.
TRAINED_STYLES = ("black on #7ee787", "black on #3fb950")
MASKED_STYLES = ("grey62", "grey42")
NEWLINE_MARK = "⏎"
TAB_MARK = "⇥"
PROGRESS_MIN_EXAMPLES = 200  # below this a progress bar only flickers

__all__ = [
    "InspectionReport",
    "inspect_dataset",
    "token_pieces",
]


@dataclass
class InspectionReport:
    """What inspecting a dataset found: the training's :class:`DataStats` and what only inspection keeps.

    ``stats`` counts the examples that encoded, exactly as data preparation for training does
    (``stats.trained_tokens`` are the loss's targets: positions ``t >= 1`` whose label is not ``-100``;
    examples with no trained token are counted in ``stats.untrained_examples`` and, as in training, not
    in the token counts). Examples that fail to encode are not in ``stats``: they are counted in
    ``failed_examples`` and the first errors are kept. ``lengths`` are the encoded lengths of the kept
    examples (those with a trained token), after truncation.
    """

    stats: DataStats = field(default_factory=DataStats)
    failed_examples: int = 0
    errors: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    max_length: int | None = None
    html_path: str | None = None

    @property
    def trained_ratio(self) -> float:
        """Trained tokens over all tokens of the kept examples."""
        return self.stats.trained_tokens / self.stats.total_tokens if self.stats.total_tokens else 0.0

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
        """JSON-ready statistics: ``stats.as_dict()`` plus the report's own fields, lengths summarized."""
        lengths = self.lengths
        return {
            **self.stats.as_dict(),
            "kept_examples": self.stats.kept_examples,
            "trained_ratio": self.trained_ratio,
            "failed_examples": self.failed_examples,
            "errors": list(self.errors),
            "formats": dict(self.formats),
            "max_length": self.max_length,
            "html_path": self.html_path,
            "min_length": min(lengths) if lengths else 0,
            "mean_length": sum(lengths) / len(lengths) if lengths else 0.0,
            "max_length_seen": max(lengths) if lengths else 0,
            "length_histogram": self.length_histogram(),
        }


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
    summary, stats = report.to_dict(), report.stats
    rows = [
        ("examples", f"{stats.examples:,}"),
        ("formats", ", ".join(f"{name}: {count:,}" for name, count in sorted(report.formats.items()))),
        ("total tokens", f"{stats.total_tokens:,}"),
        ("trained tokens", f"{stats.trained_tokens:,} ({report.trained_ratio:.1%})"),
        (
            "length min / mean / max",
            f"{summary['min_length']} / {summary['mean_length']:.1f} / {summary['max_length_seen']}",
        ),
        ("max_length", str(report.max_length)),
        ("examples truncated", f"{stats.truncated_examples:,}"),
        ("tokens truncated", f"{stats.truncated_tokens:,}"),
        ("answers cut by truncation", f"{stats.truncated_completions:,}"),
        ("turns dropped", f"{stats.dropped_turns:,}"),
        ("examples with no trained token", f"{stats.untrained_examples:,}"),
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
    axes.set_title(f"{report.stats.kept_examples:,} examples, {report.trained_ratio:.1%} of tokens trained")
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
        f"{encoded['trained_tokens']} trained, {encoded['truncated_tokens']} truncated)</small></h3>"
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
def _without_none_keys(messages: Any) -> Any:
    # Arrow (datasets' JSON loader) gives every message every key seen anywhere in the column, missing
    # ones as None; a chat template testing `message.name is defined` would then render "None".
    if not isinstance(messages, list):
        return messages
    return [
        {key: value for key, value in message.items() if value is not None}
        if isinstance(message, Mapping)
        else message
        for message in messages
    ]


def _clean(example: Any) -> Any:
    """The example with None-valued keys removed from its message dicts (see :func:`_without_none_keys`)."""
    if not isinstance(example, Mapping):
        return example
    keys = [key for key in ("messages", "prompt", "completion") if isinstance(example.get(key), list)]
    if not keys:
        return example
    return {**example, **{key: _without_none_keys(example[key]) for key in keys}}


def _format_of(example: Any) -> str:
    if not isinstance(example, Mapping):
        return "unknown"
    try:
        return detect_format([key for key, value in example.items() if value is not None])
    except ValueError:
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
    **encoder_kwargs: Any,
) -> InspectionReport:
    """Encode every example as training does, print ``num_examples`` of them and the statistics.

    Args:
        tokenizer: the training tokenizer.
        examples: rows in any format of :class:`~hf_shift_loss.data.encode.Encoder` (a list of dicts, a
            ``datasets.Dataset``, ...). ``None``-valued keys of chat messages (which Arrow adds for keys
            other messages have) are removed before encoding.
        num_examples: how many examples (the first that encode) to show token by token.
        html_path: where to write the self-contained HTML report (None: no report).
        console: where to print (default: a rich Console on stdout).
        show_progress: a progress bar; default on for datasets of 200 examples or more.
        max_errors_kept: how many error messages of failing examples to keep (all are counted).
        encoder_kwargs: :class:`~hf_shift_loss.data.encode.Encoder` options: ``max_length``,
            ``train_on``, ``train_roles``, ``train_end_of_turn``, ``add_bos``, ``add_eos``,
            ``chat_template_kwargs``.

    Returns:
        The :class:`InspectionReport`. An example that fails to encode is counted and its error kept
        (the first ``max_errors_kept``), not raised: finding such examples is what inspection is for.

    Example:
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
        >>> rows = [{"prompt": "Q: 2+2=", "completion": " 4"},
        ...         {"messages": [{"role": "user", "content": "Capital of France?"},
        ...                       {"role": "assistant", "content": "Paris."}]}]
        >>> report = inspect_dataset(tokenizer, rows, num_examples=1, train_on="completion")  # doctest: +SKIP
        >>> report.stats.examples, report.formats  # doctest: +SKIP
        (2, {'prompt_completion': 1, 'messages': 1})
    """
    console = console or Console()
    encoder = Encoder(tokenizer, **encoder_kwargs)
    report = InspectionReport(max_length=encoder.max_length, html_path=html_path)
    examples = examples if isinstance(examples, Sequence) or hasattr(examples, "__len__") else list(examples)
    total = len(examples)  # type: ignore[arg-type]
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
        formats[_format_of(example)] += 1
        try:
            encoded = encoder(_clean(example), index)
        except (ValueError, TemplateError) as error:
            report.failed_examples += 1
            if len(report.errors) < max_errors_kept:
                message = str(error)
                if not isinstance(error, ValueError):  # the encoder's own errors name the row already
                    message = f"row {index}: the chat template raised {type(error).__name__}: {message}"
                report.errors.append(message)
            continue
        report.stats.add_example(encoded)
        if encoded["trained_tokens"] > 0:
            report.lengths.append(len(encoded["input_ids"]))
        if len(shown) < num_examples:
            shown.append((index, "", encoded))
    report.formats = dict(formats)

    # Without colour (a pipe, a log, NO_COLOR) mark trained tokens with brackets instead.
    plain = console.color_system is None or console.no_color
    for index, _, encoded in shown:
        header = (
            f"Example {index}: {len(encoded['input_ids'])} tokens, {encoded['trained_tokens']} trained, "
            f"{encoded['truncated_tokens']} truncated, {encoded['dropped_turns']} turns dropped"
            + ("" if encoded["trained_tokens"] else " (nothing trained: dropped in training)")
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
