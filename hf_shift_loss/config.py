"""``ShiftLossArguments``: ``TrainingArguments`` plus the data and loss options, and the YAML + CLI parser.

Every default of the package lives here, once. A plain ``TrainingArguments`` given to the trainer is
converted once, at construction (:meth:`ShiftLossArguments.from_training_arguments`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from hf_shift_loss.data.chat import DEFAULT_END_OF_TURN, DEFAULT_TRAIN_ROLES
from hf_shift_loss.options import (
    EndOfTurnMode,
    LossImpl,
    OnUntrained,
    PackingOverflow,
    TrainOn,
    check_choice,
    check_chunk_size,
    check_loss_options,
    check_max_length,
    check_packing,
)

__all__ = ["ShiftLossArguments", "parse_config"]

logger = logging.getLogger(__name__)


@dataclass
class ShiftLossArguments(TrainingArguments):
    """``TrainingArguments`` plus what :class:`hf_shift_loss.ShiftLossTrainer` needs for data and loss.

    Data (used when the trainer prepares the datasets itself, i.e. without a ``data_collator``):
    ``max_length``, ``packing``, ``packing_overflow``, ``padding_free``, ``train_on``, ``train_roles``,
    ``train_end_of_turn``, ``on_untrained``, ``num_proc``, ``chat_template_kwargs``,
    ``pad_to_multiple_of``. Loss: ``loss_impl``, ``z_loss``, ``fused_chunk_size``,
    ``log_token_accuracy`` and the inherited ``label_smoothing_factor``. Model loading by name:
    ``model_init_kwargs``.

    Three inherited defaults change: ``remove_unused_columns=False`` (a custom collator gets the raw
    columns; prepared datasets only hold what the batcher uses), ``prediction_loss_only=True``
    (evaluation does not gather ``[batch, seq, vocab]`` logits) and ``ddp_find_unused_parameters=False``.

    Examples:
        >>> args = ShiftLossArguments(output_dir="out", max_length=512, packing=True, train_on="last_turn")
        >>> args.max_length, args.packing, args.train_on, args.train_roles, args.loss_impl
        (512, True, 'last_turn', ['assistant'], 'auto')
    """

    # ------------------------------------------------------------------------------------------ data
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Longest sequence in tokens (None: no limit). Longer rows lose prompt tokens first, then "
            "the oldest chat turns, then answer tokens (all counted). With packing: the row capacity. "
            "Memory and time per step grow with it."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack the whole dataset into full rows of max_length (best-fit decreasing), sequences kept "
            "apart by position_ids: no padding, fewer rows per epoch. Needs an sdpa/eager/flex attention."
        },
    )
    packing_overflow: PackingOverflow = field(
        default="truncate",
        metadata={"help": "With packing, rows longer than max_length are truncated or split into pieces."},
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Lay each training micro-batch's rows end to end in one row, kept apart by position_ids: "
            "no pad token is computed, the same examples per step. sdpa/eager/flex build a dense mask over "
            "the whole micro-batch (attention cost (batch x length)^2); flash attention runs its varlen "
            "kernel. Evaluation batches stay padded."
        },
    )
    train_on: TrainOn = field(
        default="completion",
        metadata={
            "help": "What is trained: 'completion' (the completion, or every turn of train_roles in a "
            "conversation), 'last_turn' (only the last such turn), 'all' (every token)."
        },
    )
    train_roles: list[str] = field(
        default_factory=lambda: list(DEFAULT_TRAIN_ROLES),
        metadata={"help": "Chat roles whose turns are trained (e.g. assistant tool)."},
    )
    train_end_of_turn: EndOfTurnMode = field(
        default=DEFAULT_END_OF_TURN,
        metadata={
            "help": "End-of-turn tokens trained: after every trained turn ('turn'), the last one, all turns, "
            "or none. Without them the model does not learn to stop."
        },
    )
    on_untrained: OnUntrained = field(
        default="drop",
        metadata={"help": "A row left with no trained token is dropped (counted and said) or raises."},
    )
    num_proc: int | None = field(
        default=None, metadata={"help": "Processes for tokenizing the datasets (datasets.map num_proc)."}
    )
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Extra arguments of apply_chat_template (a dict, or JSON on the command line)."},
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad the sequence length up to a multiple of this (8/64 on GPUs)."}
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "from_pretrained arguments when the model is given by name (dtype, device_map...)."
        },
    )
    # ------------------------------------------------------------------------------------------ loss
    loss_impl: LossImpl = field(
        default="auto",
        metadata={
            "help": "'eager': logits [batch, seq, vocab], then causal_lm_loss. 'fused': hidden states through "
            "fused_linear_cross_entropy in chunks of trained tokens (no full logits: less memory). 'auto': "
            "fused where the model splits into backbone and head, else eager (said once, with why)."
        },
    )
    z_loss: float = field(
        default=0.0,
        metadata={"help": "Weight of the z-loss, logsumexp(logits)^2 per trained token (PaLM uses 1e-4)."},
    )
    fused_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per chunk of the fused loss (default: from a memory budget)."},
    )
    fused_sync_free: bool | None = field(
        default=None,
        metadata={
            "help": "The fused loss with fixed shapes and no host sync (every row projected, masked inside): "
            "what torch.compile(fullgraph=True) and CUDA graphs need, at the cost of projecting masked rows "
            "and of not reporting out-of-range labels. None: on exactly when torch_compile is."
        },
    )
    log_token_accuracy: bool = field(
        default=True,
        metadata={"help": "Log the argmax accuracy over trained tokens (costs one argmax per chunk)."},
    )
    # ------------------------------------------------------------------------ changed inherited defaults
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep dataset columns the model does not take (a custom collator may need them)."},
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation returns the loss only, without gathering full logits."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "Every parameter of a causal LM gets a gradient, so DDP's costly search is off."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataloader_pin_memory and not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for: torch would warn on every data loader
        for name in ("chat_template_kwargs", "model_init_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, json.loads(value))
        if isinstance(self.train_roles, str):
            self.train_roles = [self.train_roles]
        # The consumers' own checks (encoder, packer, loss), made here too so a bad value fails at parse
        # time, before a model or a dataset is loaded.
        check_max_length(self.max_length)
        check_packing(self.packing, self.max_length)
        check_loss_options(
            self.label_smoothing_factor, self.z_loss, label_smoothing_name="label_smoothing_factor"
        )
        check_chunk_size(self.fused_chunk_size, name="fused_chunk_size")
        for name, choices in _choices().items():
            check_choice(name, getattr(self, name), choices)

    def encoder_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`hf_shift_loss.data.Encoder` these arguments set: what is
        trained and how long a row may be (the trainer and ``hf-shift-loss inspect --config`` encode with
        exactly these).

        Examples:
            >>> ShiftLossArguments(output_dir="out", max_length=256).encoder_options()
            {'max_length': 256, 'train_on': 'completion', 'train_roles': ('assistant',), 'train_end_of_turn': 'turn', 'chat_template_kwargs': {}}
        """
        return {
            "max_length": self.max_length,
            "train_on": self.train_on,
            "train_roles": tuple(self.train_roles),
            "train_end_of_turn": self.train_end_of_turn,
            "chat_template_kwargs": self.chat_template_kwargs or {},
        }

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments | None) -> ShiftLossArguments:
        """``args`` as ``ShiftLossArguments``: the same values, and this class's defaults for the rest.

        ``None`` gives the defaults with ``output_dir="trainer_output"``, as ``Trainer`` does. Fields of a
        ``TrainingArguments`` subclass (TRL's ``SFTConfig``) that mean the same here are carried over
        (``max_length``, ``packing``, ``dataset_num_proc`` as ``num_proc``, ...); the others are named in
        one warning, never dropped silently.
        """
        if isinstance(args, cls):
            return args
        if args is None:
            return cls(output_dir="trainer_output")
        values = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(TrainingArguments)
            if f.init and not f.name.startswith("_")
        }
        # Values that __post_init__ turned into objects go back to what the constructor takes.
        for name, value in values.items():
            if hasattr(value, "value") and type(value).__module__.startswith("transformers"):
                values[name] = value.value
        # Where the given args keep TrainingArguments' default of a default this class changes, this
        # class's default applies (a plain TrainingArguments must not bring back remove_unused_columns).
        base_defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
        for name in _CHANGED_DEFAULTS:
            if values.get(name) == base_defaults[name]:
                del values[name]
        ours = {f.name for f in dataclasses.fields(cls) if f.init}
        ignored = []
        for f in dataclasses.fields(args):
            if not f.init or f.name in values or f.name.startswith("_") or f.name in base_defaults:
                continue
            name = _SAME_MEANING.get(f.name, f.name)
            if name in ours:
                values[name] = getattr(args, f.name)
            elif getattr(args, f.name) != f.default:
                ignored.append(f"{f.name}={getattr(args, f.name)!r}")
        if ignored:
            logger.warning(
                "%s fields with no ShiftLossArguments equivalent are ignored: %s (see docs/migrating-from-trl.md)",
                type(args).__name__,
                ", ".join(ignored),
            )
        return cls(**values)


# Fields of TRL's SFTConfig that mean what another name means here.
_SAME_MEANING = {"dataset_num_proc": "num_proc"}
_CHANGED_DEFAULTS = ("remove_unused_columns", "prediction_loss_only", "ddp_find_unused_parameters")


@functools.cache
def _choices() -> dict[str, tuple[str, ...]]:
    """The choices of every ``Literal`` field this class declares, read from its annotations (each
    vocabulary is declared once, in :mod:`hf_shift_loss.options`)."""
    hints = get_type_hints(ShiftLossArguments)
    return {
        name: get_args(hints[name])
        for name in ShiftLossArguments.__annotations__
        if get_origin(hints[name]) is Literal
    }


def parse_config(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, *, default_config: str | None = None
) -> tuple[Any, ...]:
    """Fill dataclasses from a YAML file (``--config PATH``) and ``--field value`` overrides.

    Precedence: command line > YAML file > dataclass defaults. ``default_config`` is the YAML file used
    when ``--config`` is absent. An unknown key, in the file or on the command line, exits with status 2
    and the closest valid names ("did you mean").

    Examples:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Job:
        ...     steps: int = 10
        >>> parse_config([Job], ["--steps", "3"])
        (Job(steps=3),)
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(list(dataclass_types))
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init}
    config_path = default_config
    if "--config" in argv:
        position = argv.index("--config")
        config_path = argv[position + 1]
        del argv[position : position + 2]
    if config_path:
        with open(config_path, encoding="utf-8") as file:
            values = yaml.safe_load(file) or {}
        _refuse_unknown(values, known, f"{config_path}: unknown key")
        # A string default is parsed like a command-line value (argparse), so "2e-4" becomes a float.
        parser.set_defaults(**{key: _yaml_value(value) for key, value in values.items()})
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        names = [arg.lstrip("-").split("=")[0] for arg in remaining if arg.startswith("--")]
        _refuse_unknown(dict.fromkeys(names or remaining), known, "unknown command-line argument")
    return tuple(parsed)


def _yaml_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict) else value


def _refuse_unknown(values: dict[str, Any], known: set[str], what: str) -> None:
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=3)
            suggestion = f"; did you mean {', '.join(hint)}?" if hint else ""
            print(f"error: {what} {key!r}{suggestion}", file=sys.stderr)
            raise SystemExit(2)
