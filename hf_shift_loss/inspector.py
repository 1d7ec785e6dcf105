"""See what the loss trains on: masked and trained tokens of a dataset, in the terminal and in HTML.

Every example goes through the same :class:`~hf_shift_loss.data.encode.Encoder` as training (text,
prompt/completion, conversational prompt/completion, chat messages, pre-tokenized), so what is shown is
what is trained, and the counts are the training's :class:`~hf_shift_loss.data.stats.DataStats`.

- terminal (rich): what was inspected (data, tokenizer, options), then examples: trained tokens on a
  green background (two shades alternating, so token boundaries show), masked tokens in one dim grey;
  a newline is shown as ``⏎``.
- statistics: examples, tokens, trained tokens and their ratio, truncation, examples with nothing to
  train, examples split by packing, examples that fail to encode (with their errors), and the rows of
  each such kind ("notable" examples), found over the whole dataset, not only the first examples.
- an HTML report: the source and options, an index that jumps to every truncated, answer-cut, split,
  untrained or failing example (each shown with an anchor), the statistics, and a length histogram
  whose bins and axis follow the data (PNG, base64, inline): one self-contained file.

Used by ``hf-shift-loss inspect`` (see :mod:`hf_shift_loss.cli`) and from Python::

    report = inspect_dataset(tokenizer, dataset, num_examples=3, html_path="report.html", max_length=2048)
"""

from __future__ import annotations

import base64
import bisect
import html
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rich.console import Console
from rich.progress import track
from rich.table import Table
from rich.text import Text

try:  # a chat template's raise_exception(...) raises a jinja2 TemplateError (jinja2 comes with transformers)
    from jinja2.exceptions import TemplateError
except ImportError:  # pragma: no cover
    TemplateError = ValueError  # type: ignore[assignment,misc]

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.data.encode import Encoder, detect_format
from hf_shift_loss.data.stats import DataStats

# Trained tokens: green, two shades alternating (token boundaries); masked tokens: one dim grey.
TRAINED_STYLES = ("black on #7ee787", "black on #3fb950")
MASKED_STYLE = "grey50"
NEWLINE_MARK = "⏎"
TAB_MARK = "⇥"
SPLIT_MARK = "✂"
# Kinds of examples worth a look, in the order the report lists them: (key, heading, explanation).
NOTABLE_KINDS = (
    ("failed", "failed to encode", "the encoder raised; not trained"),
    ("untrained", "nothing trained", "no trained token left: dropped from training"),
    ("answer_cut", "answer cut", "the answer itself was cut by max_length (its end is not trained)"),
    ("truncated", "truncated", "tokens or turns removed by max_length"),
    ("split", "split by packing", "longer than max_length: packed as pieces (packing_overflow=split)"),
)
PROGRESS_MIN_EXAMPLES = 200  # below this a progress bar only flickers

__all__ = [
    "NOTABLE_KINDS",
    "InspectionReport",
    "inspect_dataset",
    "length_bin_edges",
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
    examples (those with a trained token), after truncation. ``notable`` lists the rows of each kind of
    :data:`NOTABLE_KINDS` (all of them); ``about`` says what was inspected (data, tokenizer, config) and
    ``options`` how it was encoded.
    """

    stats: DataStats = field(default_factory=DataStats)
    failed_examples: int = 0
    errors: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    max_length: int | None = None
    html_path: str | None = None
    about: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    notable: dict[str, list[int]] = field(default_factory=lambda: {key: [] for key, _, _ in NOTABLE_KINDS})

    @property
    def trained_ratio(self) -> float:
        """Trained tokens over all tokens of the kept examples."""
        return self.stats.trained_tokens / self.stats.total_tokens if self.stats.total_tokens else 0.0

    def length_histogram(self, bins: int = 25) -> dict[str, list[float]]:
        """Counts of example lengths in about ``bins`` bins of a round width (1, 2, 5, 10, 20, 25, 50, ...
        tokens) that start and end at the data's shortest and longest example."""
        if not self.lengths:
            return {"bin_edges": [], "counts": []}
        edges = length_bin_edges(min(self.lengths), max(self.lengths), bins)
        counts = [0] * (len(edges) - 1)
        for length in self.lengths:
            counts[bisect.bisect_right(edges, length) - 1] += 1
        return {"bin_edges": edges, "counts": counts}

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
            "about": dict(self.about),
            "options": dict(self.options),
            "notable_examples": {key: list(rows) for key, rows in self.notable.items()},
            "min_length": min(lengths) if lengths else 0,
            "mean_length": sum(lengths) / len(lengths) if lengths else 0.0,
            "max_length_seen": max(lengths) if lengths else 0,
            "length_histogram": self.length_histogram(),
        }


def length_bin_edges(low: int, high: int, bins: int = 25) -> list[int]:
    """Integer bin edges of a round width covering ``[low, high]`` in about ``bins`` bins.

    The width is the smallest of 1, 2, 5, 10, 20, 25, 50, 100, ... giving at most ``bins`` bins; the
    first edge is ``low`` rounded down to the width, the last lies above ``high`` (bins are
    ``[edge, next edge)``).

    Examples:
        >>> length_bin_edges(83, 372)[:3], length_bin_edges(83, 372)[-1]
        ([80, 100, 120], 380)
        >>> length_bin_edges(5, 7)
        [5, 6, 7, 8]
    """
    for width in _round_widths():
        start = low - low % width
        if (high - start) // width + 1 <= bins:
            break
    return [start + i * width for i in range((high - start) // width + 2)]


def _round_widths() -> Iterator[int]:
    scale = 1
    while True:
        yield from (int(m * scale) for m in (1, 2, 2.5, 5) if float(m * scale).is_integer())
        scale *= 10


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
    tokenizer: Any,
    input_ids: Sequence[int],
    labels: Sequence[int],
    *,
    plain: bool = False,
    cuts: Sequence[int] = (),
) -> Text:
    """A rich Text of one example: trained tokens on green (two shades: boundaries), masked ones dim.

    ``plain`` (a terminal without colour, a log file): trained runs are wrapped in ``⟦ ⟧`` and tokens are
    separated by ``|``, so the view survives as plain text. ``cuts``: positions where packing splits the
    example, marked ``✂``.
    """
    text = Text()
    previous_trained = False
    cuts = set(cuts)
    for n, (start, end, piece) in enumerate(token_pieces(tokenizer, input_ids)):
        trained = any(label != IGNORE_INDEX for label in labels[start:end])
        if start in cuts:
            text.append(SPLIT_MARK, style="bold red")
        if plain:
            opening = "⟦" if trained and not previous_trained else ""
            closing = "⟧" if previous_trained and not trained else ""
            separator = "" if n == 0 or opening or closing or text.plain.endswith(("\n", SPLIT_MARK)) else "|"
            text.append(closing + separator + opening + _visible(piece))
        else:
            text.append(_visible(piece), style=TRAINED_STYLES[n % 2] if trained else MASKED_STYLE)
        previous_trained = trained
    if plain and previous_trained:
        text.append("⟧")
    return text


def render_html_tokens(
    tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], cuts: Sequence[int] = ()
) -> str:
    """The same view as :func:`render_text` as HTML spans (hover shows position, id and label)."""
    spans = []
    cuts = set(cuts)
    for n, (start, end, piece) in enumerate(token_pieces(tokenizer, input_ids)):
        trained = any(label != IGNORE_INDEX for label in labels[start:end])
        if start in cuts:
            spans.append(
                f'<span class="cut" title="packing splits here (position {start})">{SPLIT_MARK}</span>'
            )
        css_class = f"t{n % 2}" if trained else "m"
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


def about_table(report: InspectionReport) -> Table:
    """What was inspected and how it was encoded: data, tokenizer, config, then the encoder's options."""
    table = Table(title="Inspected", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in _about_rows(report):
        table.add_row(name, value)
    return table


def _about_rows(report: InspectionReport) -> list[tuple[str, str]]:
    def shown(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return ", ".join(map(str, value))
        return json.dumps(value) if isinstance(value, dict) else str(value)

    return [*report.about.items(), *((name, shown(value)) for name, value in report.options.items())]


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
    if getattr(stats, "blank_completions", 0):
        rows.append(("blank answers", f"{stats.blank_completions:,}"))
    if report.options.get("packing_overflow") == "split":
        rows.append(("examples split by packing", f"{stats.split_examples:,}"))
        rows.append(("trained targets lost at split points", f"{stats.lost_boundary_targets:,}"))
    if report.failed_examples:
        rows.append(("examples that failed to encode", f"{report.failed_examples:,}"))
    return rows


def length_histogram_png(report: InspectionReport) -> bytes | None:
    """A PNG histogram of example lengths (matplotlib, Agg), or None without matplotlib or data.

    The bins (:meth:`InspectionReport.length_histogram`) and the x axis span the data; ``max_length`` is
    drawn where it lies within a quarter of that span past the longest example, else only named."""
    if not report.lengths:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    histogram = report.length_histogram()
    edges, counts = histogram["bin_edges"], histogram["counts"]
    low, high = edges[0], edges[-1]
    figure, axes = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    axes.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="#3fb950", edgecolor="white")
    note = ""
    if report.max_length is not None:
        if report.max_length <= high + (high - low) / 4:
            label = f"max_length={report.max_length}"
            axes.axvline(report.max_length, color="#d1242f", linestyle="--", label=label)
            axes.legend()
            high = max(high, report.max_length + (edges[1] - edges[0]))
        else:
            note = f"; max_length {report.max_length} (off the axis)"
    axes.set_xlim(low, high)
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel(f"tokens per example (after truncation), bins of {edges[1] - edges[0]}{note}")
    axes.set_ylabel("examples")
    axes.set_title(
        f"{report.stats.kept_examples:,} examples, {min(report.lengths)}-{max(report.lengths)} tokens, "
        f"{report.trained_ratio:.1%} of tokens trained"
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #1f2328; max-width: 75em; }
.example { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-all;
           border: 1px solid #d0d7de; border-radius: 6px; padding: 0.8em; line-height: 1.5; }
.t0 { background: #7ee787; } .t1 { background: #3fb950; }
.m { color: #6e7781; }
.nl { opacity: 0.6; }
.cut { color: #d1242f; font-weight: bold; padding: 0 0.2em; }
table { border-collapse: collapse; } td { padding: 0.2em 1em; border-bottom: 1px solid #d0d7de; }
#statistics td:last-child { text-align: right; font-variant-numeric: tabular-nums; }
#about td:first-child { font-weight: 600; }
.legend span { padding: 0.1em 0.4em; }
.badge { font-size: 0.75em; padding: 0.1em 0.5em; border-radius: 1em; background: #fff8c5;
         border: 1px solid #d4a72c; margin-left: 0.4em; }
#index li { margin: 0.2em 0; } #index a { margin-right: 0.3em; }
h3 a.self { color: inherit; text-decoration: none; }
"""

Shown = tuple[int, dict[str, Any], list[str], list[int]]  # (row, encoded, notable kinds, split points)


def write_html(
    path: str, report: InspectionReport, shown: list[Shown], png: bytes | None, tokenizer: Any
) -> None:
    """One self-contained HTML file: what was inspected, an index of notable examples, the statistics,
    the histogram (inline PNG), the shown examples (each with an anchor ``example-<row>``) and errors."""

    def table(table_id: str, rows: list[tuple[str, str]], attribute: str) -> str:
        cells = "".join(
            f'<tr><td>{html.escape(name)}</td><td {attribute}="{html.escape(name)}">{html.escape(value)}</td></tr>'
            for name, value in rows
        )
        return f'<table id="{table_id}">{cells}</table>'

    image = (
        f'<img id="length-histogram" alt="length histogram" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        if png
        else ""
    )
    anchors = {row for row, _, _, _ in shown}
    index = []
    for key, heading, explanation in NOTABLE_KINDS:
        rows = report.notable.get(key, [])
        if not rows:
            continue
        target = "error" if key == "failed" else "example"
        links = " ".join(
            f'<a href="#{target}-{row}">{row}</a>' for row in rows if key == "failed" or row in anchors
        )
        hidden = len(rows) - sum(1 for row in rows if key == "failed" or row in anchors)
        more = f" (+{hidden} more, not shown)" if hidden else ""
        index.append(
            f'<li data-kind="{key}"><b>{html.escape(heading)}</b> ({len(rows):,}; {html.escape(explanation)}): '
            f"rows {links}{more}</li>"
        )
    index_html = (
        f'<h2>Examples worth a look</h2><ul id="index">{"".join(index)}</ul>'
        if index
        else '<p id="index">No example was truncated, split, left untrained or failed to encode.</p>'
    )
    examples = []
    for row, encoded, kinds, cuts in shown:
        labels = {key: heading for key, heading, _ in NOTABLE_KINDS}
        badges = "".join(f'<span class="badge">{html.escape(labels[kind])}</span>' for kind in kinds)
        body = render_html_tokens(tokenizer, encoded["input_ids"], encoded["labels"], cuts)
        examples.append(
            f'<h3 id="example-{row}"><a class="self" href="#example-{row}">Row {row}</a> '
            f"<small>({len(encoded['input_ids'])} tokens, {encoded['trained_tokens']} trained, "
            f"{encoded['truncated_tokens']} truncated, {encoded['dropped_turns']} turns dropped)</small>"
            f'{badges}</h3><div class="example" data-index="{row}">{body}</div>'
        )
    errors = "".join(
        f'<li id="error-{row}">{html.escape(error)}</li>'
        for row, error in zip(report.notable.get("failed", []), report.errors, strict=False)
    )
    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>hf-shift-loss inspect: {html.escape(report.about.get("data", ""))}</title>
<style>{HTML_STYLE}</style></head><body>
<h1>What the loss trains on</h1>
{table("about", _about_rows(report), "data-about")}
<p class="legend"><span class="t0">trained</span><span class="t1">token</span> <span class="m">masked token</span>
&nbsp; {NEWLINE_MARK} newline{f" &nbsp; {SPLIT_MARK} packing splits here" if report.notable.get("split") else ""}; hover a token for its position, id and label</p>
{index_html}
<h2>Statistics</h2>{table("statistics", _statistics_rows(report), "data-name")}
<script type="application/json" id="statistics-json">{html.escape(json.dumps(report.to_dict()))}</script>
{image}
{'<h2 id="errors">Errors</h2><ul>' + errors + "</ul>" if errors else ""}
<h2>Examples</h2>{"".join(examples)}
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
    max_notable_shown: int = 20,
    about: Mapping[str, str] | None = None,
    packing: bool = False,
    packing_overflow: str = "truncate",
    **encoder_kwargs: Any,
) -> InspectionReport:
    """Encode every example as training does, print ``num_examples`` of them and the statistics.

    Args:
        tokenizer: the training tokenizer.
        examples: rows in any format of :class:`~hf_shift_loss.data.encode.Encoder` (a list of dicts, a
            ``datasets.Dataset``, ...). ``None``-valued keys of chat messages (which Arrow adds for keys
            other messages have) are removed before encoding.
        num_examples: how many examples (the first that encode) to show token by token.
        html_path: where to write the self-contained HTML report (None: no report). Besides the first
            ``num_examples``, it shows up to ``max_notable_shown`` examples of each notable kind
            (:data:`NOTABLE_KINDS`: truncated, answer cut, split, untrained, failed), found anywhere in
            the dataset, with an index that links to them.
        console: where to print (default: a rich Console on stdout).
        show_progress: a progress bar; default on for datasets of 200 examples or more.
        max_errors_kept: how many error messages of failing examples to keep (all are counted).
        max_notable_shown: how many examples of each notable kind the HTML report shows.
        about: what is inspected, for the report's header (``{"data": ..., "tokenizer": ...}``).
        packing, packing_overflow: as ``ShiftLossArguments``; with ``packing_overflow="split"`` examples
            longer than ``max_length`` are kept whole and counted (and marked) where packing splits them.
        encoder_kwargs: :class:`~hf_shift_loss.data.encode.Encoder` options: ``max_length``,
            ``train_on``, ``train_roles``, ``train_end_of_turn``, ``add_bos``, ``add_eos``,
            ``chat_template_kwargs``.

    Returns:
        The :class:`InspectionReport`. An example that fails to encode is counted and its error kept
        (the first ``max_errors_kept``), not raised: finding such examples is what inspection is for.

    Examples:
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
    split_length = encoder.max_length if packing and packing_overflow == "split" else None
    if split_length is not None:  # as prepare_dataset: the packer splits long rows, the encoder keeps them
        encoder = replace(encoder, max_length=None)
    report = InspectionReport(max_length=split_length or encoder.max_length, html_path=html_path)
    report.about = dict(about or {})
    report.options = {
        "max_length": report.max_length,
        "train_on": encoder.train_on,
        "train_roles": list(encoder.train_roles),
        "train_end_of_turn": encoder.train_end_of_turn,
        "add_eos": encoder.add_eos,
        **(
            {"chat_template_kwargs": dict(encoder.chat_template_kwargs)}
            if encoder.chat_template_kwargs
            else {}
        ),
        **({"packing": True, "packing_overflow": packing_overflow} if packing else {}),
    }
    examples = examples if isinstance(examples, Sequence) or hasattr(examples, "__len__") else list(examples)
    total = len(examples)  # type: ignore[arg-type]
    if show_progress is None:
        show_progress = total >= PROGRESS_MIN_EXAMPLES
    formats: Counter[str] = Counter()
    shown: list[Shown] = []
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
            report.notable["failed"].append(index)
            if len(report.errors) < max_errors_kept:
                message = str(error)
                if not isinstance(error, ValueError):  # the encoder's own errors name the row already
                    message = f"row {index}: the chat template raised {type(error).__name__}: {message}"
                report.errors.append(message)
            continue
        cuts: list[int] = []
        if split_length is not None and len(encoded["input_ids"]) > split_length:
            cuts = list(range(split_length, len(encoded["input_ids"]), split_length))
            report.stats.split_examples += 1
            lost = sum(1 for cut in cuts if encoded["labels"][cut] != IGNORE_INDEX)
            report.stats.lost_boundary_targets += lost
            encoded = {**encoded, "trained_tokens": encoded["trained_tokens"] - lost}
        report.stats.add_example(encoded)
        kinds = [
            kind
            for kind, present in (
                ("untrained", encoded["trained_tokens"] == 0),
                ("answer_cut", bool(encoded.get("truncated_completion"))),
                ("truncated", encoded["truncated_tokens"] > 0 or encoded["dropped_turns"] > 0),
                ("split", bool(cuts)),
            )
            if present
        ]
        for kind in kinds:
            report.notable[kind].append(index)
        if encoded["trained_tokens"] > 0:
            report.lengths.append(len(encoded["input_ids"]))
        if len(shown) < num_examples or any(len(report.notable[kind]) <= max_notable_shown for kind in kinds):
            shown.append((index, encoded, kinds, cuts))
    report.formats = dict(formats)

    console.print(about_table(report))
    # Without colour (a pipe, a log, NO_COLOR) mark trained tokens with brackets instead.
    plain = console.color_system is None or console.no_color
    for index, encoded, _, cuts in shown[:num_examples]:
        header = (
            f"Row {index}: {len(encoded['input_ids'])} tokens, {encoded['trained_tokens']} trained, "
            f"{encoded['truncated_tokens']} truncated, {encoded['dropped_turns']} turns dropped"
            + ("" if encoded["trained_tokens"] else " (nothing trained: dropped in training)")
        )
        console.rule(header, align="left")
        rendered = render_text(tokenizer, encoded["input_ids"], encoded["labels"], plain=plain, cuts=cuts)
        console.print(rendered, highlight=False)
    if plain:
        legend = Text(f"legend: ⟦trained|tokens⟧ masked|tokens  {NEWLINE_MARK} newline")
    else:
        legend = Text("legend: ")
        legend.append("trained", style=TRAINED_STYLES[0]).append("token", style=TRAINED_STYLES[1])
        legend.append("  ").append("masked token", style=MASKED_STYLE).append(f"  {NEWLINE_MARK} newline")
    if report.notable["split"]:
        legend.append(f"  {SPLIT_MARK} packing splits here")
    console.print(legend)
    console.print(statistics_table(report))
    for key, heading, _ in NOTABLE_KINDS:
        rows = report.notable[key]
        if rows and key != "failed":
            listed = ", ".join(map(str, rows[:10])) + (
                f", ... ({len(rows)} in all)" if len(rows) > 10 else ""
            )
            console.print(Text(f"{heading}: rows {listed}", style="yellow"))
    for error in report.errors:
        console.print(Text(f"error: {error}", style="red"))

    if html_path is not None:
        write_html(html_path, report, shown, length_histogram_png(report), tokenizer)
        console.print(f"HTML report: {html_path}")
    return report
