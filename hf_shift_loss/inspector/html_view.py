"""The HTML view of an :class:`~hf_shift_loss.inspector.report.InspectionReport`: one self-contained file.

The source and options, an index that jumps to every truncated, answer-cut, split, untrained or failing
example (each shown under an anchor), the statistics (a table, and as JSON for scripts), a length
histogram whose bins and axis follow the data (PNG, base64, inline), and the token view of each shown
example. Every text from the data is escaped for where it stands: HTML entities in the page, JSON
``\\u`` escapes in the embedded ``<script type="application/json">``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from typing import Any

from hf_shift_loss.inspector.report import NOTABLE_KINDS, InspectionReport, Shown, about_rows, statistics_rows
from hf_shift_loss.inspector.tokens import NEWLINE_MARK, SPLIT_MARK, TAB_MARK, labelled_pieces

__all__ = ["json_for_script", "length_histogram_png", "render_html_tokens", "write_html"]

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
# Inside <script> a browser reads raw text up to "</script" (and "<!--" changes how it gets there), and
# entities are not decoded: so these characters are written as JSON escapes, which JSON.parse reads back.
_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026"}


def json_for_script(value: Any) -> str:
    """``value`` as JSON text that can stand inside ``<script type="application/json">`` as it is.

    ``<``, ``>`` and ``&`` become ``\\u003c``, ``\\u003e``, ``\\u0026`` (valid JSON string escapes; they
    only occur inside strings), so no data can end the element, and ``JSON.parse`` of the element's
    text gives ``value`` back.

    Examples:
        >>> json_for_script({"data": "</script><!-- &amp;"})
        '{"data": "\\\\u003c/script\\\\u003e\\\\u003c!-- \\\\u0026amp;"}'
        >>> json.loads(json_for_script({"data": "</script>"}))
        {'data': '</script>'}
    """
    return json.dumps(value).translate(_SCRIPT_ESCAPES)


def render_html_tokens(
    tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], cuts: Sequence[int] = ()
) -> str:
    """The terminal view's token view as HTML spans (hover shows position, id and label)."""
    spans = []
    cuts = set(cuts)
    for n, (start, end, piece, trained) in enumerate(labelled_pieces(tokenizer, input_ids, labels)):
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


def _table(table_id: str, rows: list[tuple[str, str]], attribute: str) -> str:
    cells = "".join(
        f'<tr><td>{html.escape(name)}</td><td {attribute}="{html.escape(name)}">{html.escape(value)}</td></tr>'
        for name, value in rows
    )
    return f'<table id="{table_id}">{cells}</table>'


def _index_html(report: InspectionReport, anchors: set[int]) -> str:
    """The list of notable rows of each kind, linked to their anchors (the hidden ones counted)."""
    index = []
    for key, heading, explanation in NOTABLE_KINDS:
        rows = report.notable.get(key, [])
        if not rows:
            continue
        target = "error" if key == "failed" else "example"
        linked = [row for row in rows if key == "failed" or row in anchors]
        links = " ".join(f'<a href="#{target}-{row}">{row}</a>' for row in linked)
        more = f" (+{len(rows) - len(linked)} more, not shown)" if len(rows) > len(linked) else ""
        index.append(
            f'<li data-kind="{key}"><b>{html.escape(heading)}</b> ({len(rows):,}; {html.escape(explanation)}): '
            f"rows {links}{more}</li>"
        )
    if not index:
        return '<p id="index">No example was truncated, split, left untrained or failed to encode.</p>'
    return f'<h2>Examples worth a look</h2><ul id="index">{"".join(index)}</ul>'


def _example_html(shown: Shown, tokenizer: Any) -> str:
    row, encoded = shown.row, shown.encoded
    headings = {key: heading for key, heading, _ in NOTABLE_KINDS}
    badges = "".join(f'<span class="badge">{html.escape(headings[kind])}</span>' for kind in shown.kinds)
    body = render_html_tokens(tokenizer, encoded["input_ids"], encoded["labels"], shown.cuts)
    return (
        f'<h3 id="example-{row}"><a class="self" href="#example-{row}">Row {row}</a> '
        f"<small>({len(encoded['input_ids'])} tokens, {encoded['trained_tokens']} trained, "
        f"{encoded['truncated_tokens']} truncated, {encoded['dropped_turns']} turns dropped)</small>"
        f'{badges}</h3><div class="example" data-index="{row}">{body}</div>'
    )


def write_html(
    path: str, report: InspectionReport, shown: Sequence[Shown], png: bytes | None, tokenizer: Any
) -> None:
    """One self-contained HTML file: what was inspected, an index of notable examples, the statistics
    (a table and ``<script type="application/json" id="statistics-json">``), the histogram (inline
    PNG), the shown examples (each with an anchor ``example-<row>``) and errors."""
    image = (
        f'<img id="length-histogram" alt="length histogram" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        if png
        else ""
    )
    errors = "".join(
        f'<li id="error-{row}">{html.escape(error)}</li>'
        for row, error in zip(report.notable.get("failed", []), report.errors, strict=False)
    )
    split_legend = f" &nbsp; {SPLIT_MARK} packing splits here" if report.notable.get("split") else ""
    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>hf-shift-loss inspect: {html.escape(report.about.get("data", ""))}</title>
<style>{HTML_STYLE}</style></head><body>
<h1>What the loss trains on</h1>
{_table("about", about_rows(report), "data-about")}
<p class="legend"><span class="t0">trained</span><span class="t1">token</span> <span class="m">masked token</span>
&nbsp; {NEWLINE_MARK} newline{split_legend}; hover a token for its position, id and label</p>
{_index_html(report, {example.row for example in shown})}
<h2>Statistics</h2>{_table("statistics", statistics_rows(report), "data-name")}
<script type="application/json" id="statistics-json">{json_for_script(report.to_dict())}</script>
{image}
{'<h2 id="errors">Errors</h2><ul>' + errors + "</ul>" if errors else ""}
<h2>Examples</h2>{"".join(_example_html(example, tokenizer) for example in shown)}
</body></html>
"""
    with open(path, "w", encoding="utf-8") as file:
        file.write(document)
