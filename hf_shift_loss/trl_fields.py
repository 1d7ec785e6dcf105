"""TRL's ``SFTConfig`` fields and what each becomes here: the one table, read by the arguments and the docs.

Every field that TRL's ``SFTConfig`` adds to ``TrainingArguments`` is one of:

- ``"same"``: a :class:`hf_shift_loss.ShiftLossArguments` field of the same name and meaning;
- ``"alias"``: accepted under TRL's name (on ``ShiftLossArguments`` too) and moved onto our field,
  with the same mapping whether it comes from an ``SFTConfig`` or from keyword arguments;
- ``"refused"``: accepted only at its default; any other value is a ``ValueError`` naming what to use
  instead, because silently dropping it would change what is trained.

docs/migrating-from-trl.md shows this table, and a test fails when a field of the installed TRL is
missing from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["TRL_FIELDS", "TrlField", "apply_trl_aliases"]


@dataclass(frozen=True)
class TrlField:
    """What one ``SFTConfig`` field becomes here: ``how`` (same / alias / refused), ``ours`` (the field
    it sets; for a refused one, what to use instead) and ``default`` (the value that is accepted as a no-op
    for an alias or a refused field)."""

    how: Literal["same", "alias", "refused"]
    ours: str
    default: Any = None


TRL_FIELDS: dict[str, TrlField] = {
    "model_init_kwargs": TrlField("same", "model_init_kwargs"),
    "trust_remote_code": TrlField("alias", "model_init_kwargs", False),
    "router_aux_loss_coef": TrlField(
        "refused",
        "the model's config.router_aux_loss_coef (the loss adds the load-balancing loss as the model's own "
        "forward does, with the model's coefficient): set it on the model config",
    ),
    "chat_template_path": TrlField("same", "chat_template_path"),
    "dataset_text_field": TrlField("same", "dataset_text_field"),
    "dataset_kwargs": TrlField(
        "refused",
        "data_collator= (a given collator gets the datasets as they are, never prepared: TRL's "
        "skip_prepare_dataset)",
    ),
    "dataset_num_proc": TrlField("alias", "num_proc"),
    "eos_token": TrlField("same", "eos_token"),
    "max_length": TrlField("same", "max_length"),
    "truncation_mode": TrlField("same", "truncation_mode"),
    "shuffle_dataset": TrlField("same", "shuffle_dataset"),
    "packing": TrlField("same", "packing"),
    "packing_strategy": TrlField("alias", "packing_overflow"),
    "padding_free": TrlField("same", "padding_free"),
    "pad_to_multiple_of": TrlField("same", "pad_to_multiple_of"),
    "eval_packing": TrlField("same", "eval_packing"),
    "completion_only_loss": TrlField("same", "completion_only_loss"),
    "assistant_only_loss": TrlField("same", "assistant_only_loss"),
    "loss_type": TrlField("same", "loss_type"),
    "activation_offloading": TrlField(
        "refused",
        "gradient_checkpointing=True (activation offloading to the CPU is not implemented here)",
        False,
    ),
    "pad_token": TrlField(
        "refused", "tokenizer.pad_token = ... on the tokenizer passed as processing_class (deprecated in TRL)"
    ),
}

# packing_strategy -> packing_overflow ("wrapped" cuts sequences anywhere and lets them attend to each
# other: no equivalent).
PACKING_STRATEGIES = {"bfd": "truncate", "bfd_split": "split"}


def apply_trl_aliases(args: Any) -> None:
    """Move the TRL-named alias fields of ``args`` (a ``ShiftLossArguments``) onto ours; refuse the rest.

    An alias left at its default (``None``) is a no-op. Raises ``ValueError`` naming the field and its
    replacement for a refused field set to anything but its default, or an alias that contradicts the
    field it maps to.

    Examples:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(dataset_num_proc=4, num_proc=None, packing_strategy=None, trust_remote_code=None,
        ...     model_init_kwargs=None, router_aux_loss_coef=None, dataset_kwargs=None, activation_offloading=None,
        ...     pad_token=None)
        >>> apply_trl_aliases(args)
        >>> args.num_proc, args.dataset_num_proc
        (4, None)
    """
    for name, spec in TRL_FIELDS.items():
        if spec.how == "same" or not hasattr(args, name):
            continue
        value = getattr(args, name)
        if value is None or value == spec.default or (name == "dataset_kwargs" and not value):
            setattr(args, name, None)
            continue
        if spec.how == "refused":
            raise ValueError(f"{name}={value!r} (TRL's SFTConfig) is not supported here; use {spec.ours}")
        setattr(args, name, None)
        if name == "dataset_num_proc":
            _set_once(args, "num_proc", value, name)
        elif name == "packing_strategy":
            if value not in PACKING_STRATEGIES:
                raise ValueError(
                    f"packing_strategy={value!r} (TRL's SFTConfig) has no equivalent here: packing keeps every "
                    "sequence whole and apart (best-fit decreasing); use packing_overflow='split' (TRL's "
                    "'bfd_split') or 'truncate' (TRL's 'bfd')"
                )
            overflow = PACKING_STRATEGIES[value]
            if args.packing_overflow not in ("truncate", overflow):
                raise ValueError(
                    f"packing_strategy={value!r} means packing_overflow={overflow!r}, but packing_overflow="
                    f"{args.packing_overflow!r} is set too: set one of them"
                )
            args.packing_overflow = overflow
        elif name == "trust_remote_code":
            args.model_init_kwargs = {**(args.model_init_kwargs or {}), "trust_remote_code": bool(value)}


def _set_once(args: Any, ours: str, value: Any, trl_name: str) -> None:
    current = getattr(args, ours)
    if current is not None and current != value:
        raise ValueError(
            f"{trl_name}={value!r} (TRL's name of {ours}) contradicts {ours}={current!r}: set one"
        )
    setattr(args, ours, value)
