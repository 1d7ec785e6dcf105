"""The option vocabularies, each declared once, and the checks that more than one entry point makes.

Each choice set is one ``Literal`` alias; its runtime tuple of choices is derived from it
(``typing.get_args``), never spelled again. The alias types the parameters and dataclass fields that
take the option (``HfArgumentParser`` turns it into the command line's ``choices``); the tuple is what
error messages list and what :func:`check_choice` checks against.

The checks are called where the value is consumed (the encoder, the packer, the loss) and, to fail
before anything is loaded, by :class:`hf_shift_loss.ShiftLossArguments`: one definition and one
message each.

This module imports nothing from the package: the data and the loss sides both read it.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "END_OF_TURN_MODES",
    "LOSS_IMPLS",
    "LOSS_TYPES",
    "ON_UNTRAINED",
    "PACKING_OVERFLOWS",
    "REDUCTIONS",
    "TRAIN_ON",
    "TRUNCATION_MODES",
    "EndOfTurnMode",
    "LossImpl",
    "LossType",
    "LossTypeOrAlias",
    "OnUntrained",
    "PackingOverflow",
    "Reduction",
    "TrainOn",
    "TruncationMode",
    "check_choice",
    "check_chunk_size",
    "check_loss_options",
    "check_max_length",
    "check_packing",
]

TrainOn = Literal["completion", "all", "last_turn"]
"""What is trained: the completion (or every turn of the trained roles), only the last such turn, or
every token."""
EndOfTurnMode = Literal["turn", "last", "all", "none"]
"""Which end-of-turn tokens of a conversation are trained (see :func:`hf_shift_loss.encode_messages`)."""
OnUntrained = Literal["drop", "raise"]
"""What happens to a row left with no trained token: dropped and counted, or a ValueError naming it."""
PackingOverflow = Literal["truncate", "split"]
"""With packing, what happens to a row longer than ``max_length``."""
LossImpl = Literal["auto", "eager", "fused"]
"""How the loss runs on a model: full logits, the chunked fused lm_head + cross-entropy, or chosen."""
Reduction = Literal["mean", "sum", "none"]
"""How the per-token losses are reduced (see :func:`hf_shift_loss.causal_lm_loss`)."""
TruncationMode = Literal["auto", "keep_start", "keep_end"]
"""How a row longer than ``max_length`` is cut: by format, or TRL's first / last ``max_length`` tokens."""
LossType = Literal["nll", "dft"]
"""The per-token loss: the cross-entropy, or DFT's weighting of it (:mod:`hf_shift_loss.loss.weighting`)."""
LossTypeOrAlias = Literal[LossType, "chunked_nll"]
"""``LossType`` or TRL's deprecated ``"chunked_nll"`` (= ``"nll"``), as ``ShiftLossArguments`` takes it."""

TRAIN_ON: tuple[str, ...] = get_args(TrainOn)
END_OF_TURN_MODES: tuple[str, ...] = get_args(EndOfTurnMode)
ON_UNTRAINED: tuple[str, ...] = get_args(OnUntrained)
PACKING_OVERFLOWS: tuple[str, ...] = get_args(PackingOverflow)
LOSS_IMPLS: tuple[str, ...] = get_args(LossImpl)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
TRUNCATION_MODES: tuple[str, ...] = get_args(TruncationMode)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the option and its choices if ``value`` is not one of ``choices``.

    Examples:
        >>> check_choice("on_untrained", "drop", ON_UNTRAINED)
        >>> check_choice("train_on", "last", TRAIN_ON)
        Traceback (most recent call last):
        ...
        ValueError: train_on must be 'completion', 'all' or 'last_turn', got 'last'
    """
    if value not in choices:
        *first, last = [repr(choice) for choice in choices]
        listed = f"{', '.join(first)} or {last}" if first else last
        raise ValueError(f"{name} must be {listed}, got {value!r}")


def check_max_length(max_length: int | None) -> None:
    """A row's length limit: ``None`` (no limit) or at least 2, one input and one target after the shift.

    Examples:
        >>> check_max_length(1)
        Traceback (most recent call last):
        ...
        ValueError: max_length must be at least 2 (one input and one target), got 1
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one input and one target), got {max_length}")


def check_packing(packing: bool, max_length: int | None) -> None:
    """Packing fills rows up to ``max_length``: without it there is no capacity.

    Examples:
        >>> check_packing(True, None)
        Traceback (most recent call last):
        ...
        ValueError: packing needs max_length: it is the capacity of a packed row (set max_length, or packing=False)
    """
    if packing and max_length is None:
        raise ValueError(
            "packing needs max_length: it is the capacity of a packed row (set max_length, or packing=False)"
        )


def check_chunk_size(chunk_size: int | None, *, name: str = "chunk_size") -> None:
    """Rows per chunk of the fused loss: ``None`` (from a memory budget) or a positive number.

    Examples:
        >>> check_chunk_size(0, name="fused_chunk_size")
        Traceback (most recent call last):
        ...
        ValueError: fused_chunk_size must be a positive number of rows, got 0
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{name} must be a positive number of rows, got {chunk_size}")


def check_loss_options(
    label_smoothing: float, z_loss: float, *, label_smoothing_name: str = "label_smoothing"
) -> None:
    """The loss options' ranges: label smoothing in ``[0, 1)``, z-loss ``>= 0`` (a negative one would
    reward large logits). ``label_smoothing_name`` is how the caller spells the option
    (``ShiftLossArguments`` inherits ``label_smoothing_factor``).

    Examples:
        >>> check_loss_options(0.1, 1e-4)
        >>> check_loss_options(0.0, -1.0)
        Traceback (most recent call last):
        ...
        ValueError: z_loss must be >= 0, got -1.0
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{label_smoothing_name} must be in [0, 1), got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
