"""One statistics type for what data preparation did: counted where it happens, carried with the data.

The encoder writes per-example counts next to ``input_ids``/``labels`` (columns of the prepared
dataset, :data:`COUNT_COLUMNS`); :meth:`DataStats.from_counts` adds them up once, in the process that
prepared the dataset. Packing adds its own counts. The trainer logs these numbers, the inspector and
the recipe print them: the same type everywhere, never read back from another object's attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

__all__ = ["COUNT_COLUMNS", "DataStats"]

# Per-example counts that the encoder returns next to input_ids/labels.
COUNT_COLUMNS = (
    "trained_tokens",
    "truncated_tokens",
    "truncated_completion",
    "dropped_turns",
    "blank_completion",
    "special_tokens_in_content",
)


@dataclass
class DataStats:
    """What preparing one dataset kept, cut, dropped and packed. All fields are exact counts.

    Examples:
        >>> stats = DataStats.from_counts([{"input_ids": [1, 2, 3], "trained_tokens": 2,
        ...                                 "truncated_tokens": 1, "truncated_completion": 0,
        ...                                 "dropped_turns": 0}])
        >>> stats.examples, stats.total_tokens, stats.trained_tokens, stats.truncated_examples
        (1, 3, 2, 1)
    """

    examples: int = 0
    """Examples encoded (before dropping the untrainable ones)."""
    total_tokens: int = 0
    """Tokens of the kept examples, after truncation."""
    trained_tokens: int = 0
    """Trained targets of the kept examples (labels other than -100, after the shift)."""
    truncated_examples: int = 0
    """Examples that lost tokens or turns to ``max_length``."""
    truncated_tokens: int = 0
    """Tokens removed by ``max_length`` (prompt tokens first, then answer tokens)."""
    truncated_completions: int = 0
    """Examples whose answer itself was cut (its end-of-turn / EOS token is then not trained)."""
    dropped_turns: int = 0
    """Chat messages removed from the start of conversations by ``max_length``."""
    untrained_examples: int = 0
    """Examples with no trained token after masking and truncation: dropped from the dataset."""
    blank_completions: int = 0
    """Prompt/completion examples whose completion is only whitespace (they train little but EOS)."""
    special_tokens_in_content: int = 0
    """Examples whose content holds a special-token string (read as the control token unless
    ``split_special_tokens``)."""
    packed_rows: int = 0
    """Rows of ``max_length`` produced by packing (0 without packing)."""
    packed_capacity: int = 0
    """``packed_rows * max_length``: what the rows would hold if full."""
    split_examples: int = 0
    """Examples longer than ``max_length`` split into pieces by packing (``packing_overflow="split"``)."""
    lost_boundary_targets: int = 0
    """Trained targets lost at split points (a piece's first token has no context from the previous one)."""

    @property
    def kept_examples(self) -> int:
        return self.examples - self.untrained_examples

    @property
    def packing_fill(self) -> float:
        """Fraction of the packed rows' capacity holding real tokens (0 without packing)."""
        return self.total_tokens / self.packed_capacity if self.packed_capacity else 0.0

    @classmethod
    def from_counts(cls, rows: object) -> DataStats:
        """Add up encoded rows (mappings with ``input_ids`` and the :data:`COUNT_COLUMNS`)."""
        stats = cls()
        for row in rows:  # type: ignore[attr-defined]
            stats.add_example(row)
        return stats

    def add_example(self, encoded: Mapping[str, object]) -> None:
        """Count one encoded example; untrainable ones count as dropped, not as kept tokens."""
        self.examples += 1
        trained = int(encoded["trained_tokens"])
        truncated = int(encoded.get("truncated_tokens", 0))
        dropped_turns = int(encoded.get("dropped_turns", 0))
        self.truncated_tokens += truncated
        self.truncated_examples += int(truncated > 0 or dropped_turns > 0)
        self.truncated_completions += int(encoded.get("truncated_completion", 0))
        self.dropped_turns += dropped_turns
        self.blank_completions += int(encoded.get("blank_completion", 0))
        self.special_tokens_in_content += int(encoded.get("special_tokens_in_content", 0))
        if trained == 0:
            self.untrained_examples += 1
            return
        self.total_tokens += len(encoded["input_ids"])  # type: ignore[arg-type]
        self.trained_tokens += trained

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "packing_fill": self.packing_fill}

    def log_entries(self, prefix: str = "data") -> dict[str, float]:
        """The counts a training log line carries (``data/truncated_tokens``, ...)."""
        entries = {
            "kept_examples": self.kept_examples,
            "untrained_examples": self.untrained_examples,
            "truncated_examples": self.truncated_examples,
            "truncated_tokens": self.truncated_tokens,
            "truncated_completions": self.truncated_completions,
            "dropped_turns": self.dropped_turns,
            "blank_completions": self.blank_completions,
            "special_tokens_in_content": self.special_tokens_in_content,
        }
        if self.packed_rows:
            entries.update(packing_fill=round(self.packing_fill, 4), split_examples=self.split_examples)
        return {f"{prefix}/{key}": float(value) for key, value in entries.items()}

    def summary(self) -> str:
        """One paragraph for people: what is trained, what was cut or dropped, how full the rows are."""
        ratio = self.trained_tokens / self.total_tokens if self.total_tokens else 0.0
        text = (
            f"{self.kept_examples} of {self.examples} examples kept, {self.total_tokens} tokens, "
            f"{self.trained_tokens} trained ({ratio:.1%}); truncated: {self.truncated_examples} examples / "
            f"{self.truncated_tokens} tokens ({self.truncated_completions} answers cut, {self.dropped_turns} "
            f"turns dropped); no trained token (dropped): {self.untrained_examples} examples"
        )
        if self.packed_rows:
            text += (
                f"; packed into {self.packed_rows} rows, {self.packing_fill:.1%} full, "
                f"{self.split_examples} examples split ({self.lost_boundary_targets} targets lost at splits)"
            )
        return text
