"""The terminal view of an :class:`~hf_shift_loss.inspector.report.InspectionReport` (rich).

What was inspected (data, tokenizer, options), then examples: trained tokens on a green background (two
shades alternating, so token boundaries show), masked tokens in one dim grey, a newline shown as ``⏎``;
then the statistics and the rows of each notable kind. Without colour (a pipe, a log, ``NO_COLOR``)
trained runs are wrapped in ``⟦ ⟧`` and tokens separated by ``|``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from hf_shift_loss.inspector.report import NOTABLE_KINDS, InspectionReport, Shown, about_rows, statistics_rows
from hf_shift_loss.inspector.tokens import NEWLINE_MARK, SPLIT_MARK, labelled_pieces, visible

__all__ = ["MASKED_STYLE", "TRAINED_STYLES", "about_table", "print_report", "render_text", "statistics_table"]

# Trained tokens: green, two shades alternating (token boundaries); masked tokens: one dim grey.
TRAINED_STYLES = ("black on #7ee787", "black on #3fb950")
MASKED_STYLE = "grey50"
NOTABLE_ROWS_LISTED = 10  # rows of a notable kind listed under the statistics; the count says the rest


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
    for n, (start, _, piece, trained) in enumerate(labelled_pieces(tokenizer, input_ids, labels)):
        if start in cuts:
            text.append(SPLIT_MARK, style="bold red")
        if plain:
            opening = "⟦" if trained and not previous_trained else ""
            closing = "⟧" if previous_trained and not trained else ""
            separator = "" if n == 0 or opening or closing or text.plain.endswith(("\n", SPLIT_MARK)) else "|"
            text.append(closing + separator + opening + visible(piece))
        else:
            text.append(visible(piece), style=TRAINED_STYLES[n % 2] if trained else MASKED_STYLE)
        previous_trained = trained
    if plain and previous_trained:
        text.append("⟧")
    return text


def _rows_table(
    title: str, rows: list[tuple[str, str]], first: dict[str, Any], second: dict[str, Any]
) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(**first)
    table.add_column(**second)
    for name, value in rows:
        table.add_row(name, value)
    return table


def statistics_table(report: InspectionReport) -> Table:
    """The statistics (:func:`~hf_shift_loss.inspector.report.statistics_rows`) as a table."""
    columns = {"header": "statistic"}, {"header": "value", "justify": "right"}
    return _rows_table("Dataset statistics", statistics_rows(report), *columns)


def about_table(report: InspectionReport) -> Table:
    """What was inspected and how it was encoded: data, tokenizer, config, then the encoder's options."""
    columns = {"header": "what", "style": "bold"}, {"header": "value", "overflow": "fold"}
    return _rows_table("Inspected", about_rows(report), *columns)


def _legend(plain: bool, split: bool) -> Text:
    if plain:
        legend = Text(f"legend: ⟦trained|tokens⟧ masked|tokens  {NEWLINE_MARK} newline")
    else:
        legend = Text("legend: ")
        legend.append("trained", style=TRAINED_STYLES[0]).append("token", style=TRAINED_STYLES[1])
        legend.append("  ").append("masked token", style=MASKED_STYLE).append(f"  {NEWLINE_MARK} newline")
    if split:
        legend.append(f"  {SPLIT_MARK} packing splits here")
    return legend


def _example_header(shown: Shown) -> str:
    encoded = shown.encoded
    return (
        f"Row {shown.row}: {len(encoded['input_ids'])} tokens, {encoded['trained_tokens']} trained, "
        f"{encoded['truncated_tokens']} truncated, {encoded['dropped_turns']} turns dropped"
        + ("" if encoded["trained_tokens"] else " (nothing trained: dropped in training)")
    )


def print_report(
    console: Console, report: InspectionReport, shown: Sequence[Shown], tokenizer: Any, num_examples: int
) -> None:
    """Print what was inspected, the first ``num_examples`` shown examples, the legend, the statistics,
    the rows of each notable kind and the kept errors."""
    console.print(about_table(report))
    # Without colour (a pipe, a log, NO_COLOR) mark trained tokens with brackets instead.
    plain = console.color_system is None or console.no_color
    for example in shown[:num_examples]:
        console.rule(_example_header(example), align="left")
        encoded = example.encoded
        rendered = render_text(
            tokenizer, encoded["input_ids"], encoded["labels"], plain=plain, cuts=example.cuts
        )
        console.print(rendered, highlight=False)
    console.print(_legend(plain, bool(report.notable["split"])))
    console.print(statistics_table(report))
    for key, heading, _ in NOTABLE_KINDS:
        rows = report.notable[key]
        if rows and key != "failed":
            listed = ", ".join(map(str, rows[:NOTABLE_ROWS_LISTED]))
            if len(rows) > NOTABLE_ROWS_LISTED:
                listed += f", ... ({len(rows)} in all)"
            console.print(Text(f"{heading}: rows {listed}", style="yellow"))
    for error in report.errors:
        console.print(Text(f"error: {error}", style="red"))
