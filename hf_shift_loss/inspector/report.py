"""What inspecting a dataset finds: :class:`InspectionReport`, collected by :func:`collect_report`.

Data only, no rendering: every example goes through the training's
:class:`~hf_shift_loss.data.encode.Encoder`, is counted in the training's
:class:`~hf_shift_loss.data.stats.DataStats`, and is cut where the packer cuts it
(:func:`~hf_shift_loss.data.pack.split_points`), so what the views show is what is trained. The
statistics and header rows both views print are built here too (:func:`statistics_rows`,
:func:`about_rows`).
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

try:  # a chat template's raise_exception(...) raises a jinja2 TemplateError (jinja2 comes with transformers)
    from jinja2.exceptions import TemplateError
except ImportError:  # pragma: no cover
    TemplateError = ValueError  # type: ignore[assignment,misc]

from hf_shift_loss.data.encode import Encoder, detect_format
from hf_shift_loss.data.pack import split_points
from hf_shift_loss.data.stats import DataStats
from hf_shift_loss.options import PackingOverflow

__all__ = [
    "NOTABLE_KINDS",
    "InspectionReport",
    "Shown",
    "about_rows",
    "collect_report",
    "length_bin_edges",
    "statistics_rows",
]

# Kinds of examples worth a look, in the order the report lists them: (key, heading, explanation).
NOTABLE_KINDS = (
    ("failed", "failed to encode", "the encoder raised; not trained"),
    ("untrained", "nothing trained", "no trained token left: dropped from training"),
    ("answer_cut", "answer cut", "the answer itself was cut by max_length (its end is not trained)"),
    ("truncated", "truncated", "tokens or turns removed by max_length"),
    ("split", "split by packing", "longer than max_length: packed as pieces (packing_overflow=split)"),
)


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


class Shown(NamedTuple):
    """An example the views show: its row, its encoding, its notable kinds and where packing cuts it."""

    row: int
    encoded: dict[str, Any]
    kinds: list[str]
    cuts: list[int]


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


# ------------------------------------------------------------------------------- rows both views print
def about_rows(report: InspectionReport) -> list[tuple[str, str]]:
    """What was inspected and how it was encoded: data, tokenizer, config, then the encoder's options."""

    def shown(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return ", ".join(map(str, value))
        return json.dumps(value) if isinstance(value, dict) else str(value)

    return [*report.about.items(), *((name, shown(value)) for name, value in report.options.items())]


def statistics_rows(report: InspectionReport) -> list[tuple[str, str]]:
    """The statistics as ``(name, value)`` text rows, in the order both views list them."""
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


# ---------------------------------------------------------------------------------------- collection
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


def _start_report(
    tokenizer: Any, packing: bool, packing_overflow: PackingOverflow, encoder_kwargs: Mapping[str, Any]
) -> tuple[Encoder, int | None, InspectionReport]:
    """The encoder, the split length (None: no split) and an empty report naming the options."""
    encoder = Encoder(tokenizer, **encoder_kwargs)
    split_length = encoder.max_length if packing and packing_overflow == "split" else None
    if split_length is not None:  # as prepare_dataset: the packer splits long rows, the encoder keeps them
        encoder = replace(encoder, max_length=None)
    report = InspectionReport(max_length=split_length or encoder.max_length)
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
    return encoder, split_length, report


def _record_failure(report: InspectionReport, row: int, error: Exception, max_errors_kept: int) -> None:
    report.failed_examples += 1
    report.notable["failed"].append(row)
    if len(report.errors) < max_errors_kept:
        message = str(error)
        if not isinstance(error, ValueError):  # the encoder's own errors name the row already
            message = f"row {row}: the chat template raised {type(error).__name__}: {message}"
        report.errors.append(message)


def _record_example(
    report: InspectionReport, row: int, encoded: dict[str, Any], split_length: int | None
) -> Shown:
    """Count one encoded example as training does (split where the packer splits it) and note its kinds."""
    cuts: list[int] = []
    if split_length is not None:
        cuts, lost = split_points(encoded["labels"], split_length)
        if cuts:
            report.stats.split_examples += 1
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
        report.notable[kind].append(row)
    if encoded["trained_tokens"] > 0:
        report.lengths.append(len(encoded["input_ids"]))
    return Shown(row, encoded, kinds, cuts)


def collect_report(
    tokenizer: Any,
    examples: Iterable[Mapping[str, Any]],
    *,
    num_examples: int = 3,
    max_errors_kept: int = 5,
    max_notable_shown: int = 20,
    packing: bool = False,
    packing_overflow: PackingOverflow = "truncate",
    **encoder_kwargs: Any,
) -> tuple[InspectionReport, list[Shown]]:
    """Encode every example as training does; the report and the examples worth showing.

    The arguments are :func:`~hf_shift_loss.inspector.inspect_dataset`'s. The shown examples are the
    first ``num_examples`` that encode, then up to ``max_notable_shown`` of each notable kind.
    """
    encoder, split_length, report = _start_report(tokenizer, packing, packing_overflow, encoder_kwargs)
    formats: Counter[str] = Counter()
    shown: list[Shown] = []
    for row, example in enumerate(examples):
        formats[_format_of(example)] += 1
        try:
            encoded = encoder(_clean(example), row)
        except (ValueError, TemplateError) as error:
            _record_failure(report, row, error, max_errors_kept)
            continue
        example_shown = _record_example(report, row, encoded, split_length)
        notable = any(len(report.notable[kind]) <= max_notable_shown for kind in example_shown.kinds)
        if len(shown) < num_examples or notable:
            shown.append(example_shown)
    report.formats = dict(formats)
    return report, shown
