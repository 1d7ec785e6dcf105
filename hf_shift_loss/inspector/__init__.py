"""See what the loss trains on: masked and trained tokens of a dataset, in the terminal and in HTML.

Every example goes through the same :class:`~hf_shift_loss.data.encode.Encoder` as training (text,
prompt/completion, conversational prompt/completion, chat messages, pre-tokenized), so what is shown is
what is trained, and the counts are the training's :class:`~hf_shift_loss.data.stats.DataStats`.

The rooms:

- :mod:`~hf_shift_loss.inspector.report`: the report (:class:`InspectionReport`), collected as data
  with no rendering: the statistics, the rows of each notable kind (failed, untrained, answer cut,
  truncated, split by packing, found over the whole dataset), the length histogram's bins.
- :mod:`~hf_shift_loss.inspector.terminal`: the rich view (trained tokens on green, masked ones grey).
- :mod:`~hf_shift_loss.inspector.html_view`: the self-contained HTML report (index, statistics with
  their JSON, histogram, examples under anchors).
- :mod:`~hf_shift_loss.inspector.tokens`: the text of each token and the marks both views share.
- here: :func:`inspect_dataset`, the entry: collect, print, write.

Used by ``hf-shift-loss inspect`` (see :mod:`hf_shift_loss.cli`) and from Python::

    report = inspect_dataset(tokenizer, dataset, num_examples=3, html_path="report.html", max_length=2048)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import track

from hf_shift_loss.inspector.html_view import length_histogram_png, write_html
from hf_shift_loss.inspector.report import NOTABLE_KINDS, InspectionReport, collect_report, length_bin_edges
from hf_shift_loss.inspector.terminal import print_report
from hf_shift_loss.inspector.tokens import token_pieces
from hf_shift_loss.options import PackingOverflow

__all__ = [
    "NOTABLE_KINDS",
    "InspectionReport",
    "inspect_dataset",
    "length_bin_edges",
    "token_pieces",
]

PROGRESS_MIN_EXAMPLES = 200  # below this a progress bar only flickers


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
    packing_overflow: PackingOverflow = "truncate",
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
            longer than ``max_length`` are kept whole and counted (and marked) where packing splits them
            (:func:`hf_shift_loss.data.pack.split_points`, the packer's own rule).
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
    examples = examples if isinstance(examples, Sequence) or hasattr(examples, "__len__") else list(examples)
    total = len(examples)  # type: ignore[arg-type]
    if show_progress is None:
        show_progress = total >= PROGRESS_MIN_EXAMPLES
    tracked = track(
        examples,
        total=total,
        description="encoding",
        console=console,
        disable=not show_progress,
        transient=True,
    )
    report, shown = collect_report(
        tokenizer,
        tracked,
        num_examples=num_examples,
        max_errors_kept=max_errors_kept,
        max_notable_shown=max_notable_shown,
        packing=packing,
        packing_overflow=packing_overflow,
        **encoder_kwargs,
    )
    report.about, report.html_path = dict(about or {}), html_path
    print_report(console, report, shown, tokenizer, num_examples)
    if html_path is not None:
        write_html(html_path, report, shown, length_histogram_png(report), tokenizer)
        console.print(f"HTML report: {html_path}")
    return report
