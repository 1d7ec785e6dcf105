"""``ShiftLossArguments``: ``TrainingArguments`` plus the data and loss options (the YAML + CLI parser,
:func:`parse_config`, lives in :mod:`hf_shift_loss.parsing` and is importable from here).

Every default of the package lives here, once. A plain ``TrainingArguments`` given to the trainer is
converted once, at construction (:meth:`ShiftLossArguments.from_training_arguments`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch
from transformers import TrainingArguments

from hf_shift_loss.data.chat import DEFAULT_END_OF_TURN, DEFAULT_TRAIN_ROLES
from hf_shift_loss.loss.weighting import token_weighting
from hf_shift_loss.options import (
    EndOfTurnMode,
    LossImpl,
    LossTypeOrAlias,
    OnUntrained,
    PackingOverflow,
    TrainOn,
    TruncationMode,
    check_choice,
    check_chunk_size,
    check_loss_options,
    check_max_length,
    check_packing,
)
from hf_shift_loss.parsing import parse_config
from hf_shift_loss.trl_fields import apply_trl_aliases

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
    truncation_mode: TruncationMode = field(
        default="auto",
        metadata={
            "help": "How a row longer than max_length is cut. 'auto': by format (prompt tokens first, oldest chat "
            "exchanges first, else the tail). 'keep_start' / 'keep_end': the first / last max_length tokens of "
            "the encoded row, whatever the format (TRL's modes)."
        },
    )
    split_special_tokens: bool = field(
        default=False,
        metadata={
            "help": "Tokenize the content of text and prompt/completion rows as plain text, so '<|im_start|>' typed "
            "in it is not the control token (rows holding one are counted: data/special_tokens_in_content)."
        },
    )
    dataset_text_field: str = field(
        default="text",
        metadata={"help": "The column of a text dataset (TRL's name), read as 'text'."},
    )
    eval_packing: bool | None = field(
        default=None, metadata={"help": "Pack the evaluation sets (None: as packing)."}
    )
    shuffle_dataset: bool = field(
        default=False,
        metadata={
            "help": "With packing, shuffle the encoded rows (seed: args.seed) before packing them (TRL's)."
        },
    )
    eos_token: str | None = field(
        default=None,
        metadata={
            "help": "A token of the vocabulary that becomes the tokenizer's eos_token (text and completions end "
            "with it) and is added to the model's eos ids, as TRL does. None: the tokenizer's."
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "A .jinja/.j2 file whose template replaces the tokenizer's chat template."},
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "TRL's switch, read as train_on per dataset format: None/True trains the completion of "
            "prompt/completion rows, False every token. None with assistant_only_loss None: train_on decides."
        },
    )
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "TRL's switch, read as train_on per dataset format: True trains the assistant turns of "
            "messages rows (train_on='completion'), False every token (TRL's default). None: train_on decides."
        },
    )
    # ---------------------------------------------------- TRL names: moved onto ours or refused (trl_fields.py)
    dataset_num_proc: int | None = field(default=None, metadata={"help": "TRL's name of num_proc."})
    packing_strategy: str | None = field(
        default=None,
        metadata={"help": "TRL's name: 'bfd' is packing_overflow='truncate', 'bfd_split' is 'split'."},
    )
    trust_remote_code: bool | None = field(
        default=None,
        metadata={"help": "TRL's: sets model_init_kwargs['trust_remote_code'] (and loads the tokenizer so)."},
    )
    dataset_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "TRL's; refused: pass a data_collator to skip preparation."}
    )
    activation_offloading: bool | None = field(
        default=None, metadata={"help": "TRL's; refused: use gradient_checkpointing."}
    )
    pad_token: str | None = field(
        default=None, metadata={"help": "TRL's (deprecated there); refused: set tokenizer.pad_token."}
    )
    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "TRL's; refused: set the model config's router_aux_loss_coef."}
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
    loss_type: LossTypeOrAlias = field(
        default="nll",
        metadata={
            "help": "'nll': the cross-entropy ('chunked_nll': TRL's deprecated alias). 'dft': Dynamic Fine-Tuning, "
            "each token's loss times its detached target probability (TRL's), on the eager and the fused loss."
        },
    )
    log_entropy: bool = field(
        default=True,
        metadata={
            "help": "Log entropy, the mean entropy of the predicted distribution over trained tokens (TRL's; "
            "per chunk on the fused path, one more pass over the logits on the eager one)."
        },
    )
    log_token_accuracy: bool = field(
        default=True,
        metadata={
            "help": "Log mean_token_accuracy, the argmax accuracy over trained tokens (one argmax per chunk)."
        },
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
        for name in ("chat_template_kwargs", "model_init_kwargs", "dataset_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, json.loads(value))
        apply_trl_aliases(self)
        if self.pad_to_multiple_of == "auto":  # TRL's default: 128 on Neuron only, none elsewhere
            self.pad_to_multiple_of = None
        if self.loss_type == "chunked_nll":  # TRL's deprecated alias
            self.loss_type = "nll"
        token_weighting(self.loss_type, label_smoothing=self.label_smoothing_factor, z_loss=self.z_loss)
        if self.use_liger_kernel:
            _liger_without_its_cross_entropy(self)
        if (self.completion_only_loss is not None or self.assistant_only_loss is not None) and (
            self.train_on != "completion"
        ):
            raise ValueError(
                f"train_on={self.train_on!r} and TRL's completion_only_loss/assistant_only_loss are both set; set "
                "one of them (docs/migrating-from-trl.md: what each TRL switch becomes)"
            )
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

    def encoder_options(self, data_format: str | None = None) -> dict[str, Any]:
        """The keyword arguments of :class:`hf_shift_loss.data.Encoder` these arguments set: what is
        trained and how long a row may be (the trainer and ``hf-shift-loss inspect --config`` encode with
        exactly these). ``data_format`` (:func:`hf_shift_loss.data.detect_format`) is needed only when
        TRL's ``completion_only_loss``/``assistant_only_loss`` are set (:meth:`train_on_for`).

        Examples:
            >>> ShiftLossArguments(output_dir="out", max_length=256).encoder_options()
            {'max_length': 256, 'train_on': 'completion', 'train_roles': ('assistant',), 'train_end_of_turn': 'turn', 'chat_template_kwargs': {}, 'truncation_mode': 'auto', 'split_special_tokens': False}
        """
        return {
            "max_length": self.max_length,
            "train_on": self.train_on_for(data_format),
            "train_roles": tuple(self.train_roles),
            "train_end_of_turn": self.train_end_of_turn,
            "chat_template_kwargs": self.chat_template_kwargs or {},
            "truncation_mode": self.truncation_mode,
            "split_special_tokens": self.split_special_tokens,
        }

    def train_on_for(self, data_format: str | None) -> str:
        """``train_on`` for a dataset of ``data_format``: TRL's two switches read as TRL reads them.

        Without ``completion_only_loss`` and ``assistant_only_loss`` (both None), ``train_on``. With
        either set (an ``SFTConfig`` always sets ``assistant_only_loss``): prompt/completion rows train
        the completion unless ``completion_only_loss=False``; ``messages`` rows train the assistant turns
        (``train_roles``) only with ``assistant_only_loss=True``, else every token; text rows every
        token; pre-tokenized rows their labels.

        Examples:
            >>> args = ShiftLossArguments(output_dir="out", assistant_only_loss=False)
            >>> args.train_on_for("messages"), args.train_on_for("prompt_completion")
            ('all', 'completion')
        """
        if self.completion_only_loss is None and self.assistant_only_loss is None:
            return self.train_on
        if data_format is None:
            raise ValueError(
                "with completion_only_loss/assistant_only_loss set, what is trained depends on the dataset "
                "format: pass encoder_options(data_format)"
            )
        if data_format == "prompt_completion":
            if self.completion_only_loss is False and self.assistant_only_loss:
                raise ValueError(
                    "completion_only_loss=False with assistant_only_loss=True (the assistant turns of the prompt "
                    "too) is not supported for prompt/completion rows; put the conversation in a 'messages' "
                    "column, or keep completion_only_loss=True"
                )
            return "all" if self.completion_only_loss is False else "completion"
        if data_format == "messages":
            return "completion" if self.assistant_only_loss else "all"
        return "completion" if data_format == "tokenized" else "all"

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments | None) -> ShiftLossArguments:
        """``args`` as ``ShiftLossArguments``: the same values, and this class's defaults for the rest.

        ``None`` gives the defaults with ``output_dir="trainer_output"``, as ``Trainer`` does. The fields
        of TRL's ``SFTConfig`` are carried over as :data:`hf_shift_loss.trl_fields.TRL_FIELDS` says (the
        same field, an alias, or a ``ValueError`` naming the replacement when set); a field of any other
        ``TrainingArguments`` subclass that has no equivalent here raises when it is not at its default.
        Nothing that changes what is trained is dropped.

        Examples:
            >>> from transformers import TrainingArguments
            >>> ShiftLossArguments.from_training_arguments(TrainingArguments(output_dir="out")).max_length
            1024
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
        unknown = []
        for f in dataclasses.fields(args):
            if not f.init or f.name in values or f.name.startswith("_") or f.name in base_defaults:
                continue
            if f.name in ours:  # ours, or a TRL field (trl_fields.TRL_FIELDS) mapped in __post_init__
                values[f.name] = getattr(args, f.name)
            elif getattr(args, f.name) != f.default:
                unknown.append(f"{f.name}={getattr(args, f.name)!r}")
        if unknown:
            raise ValueError(
                f"{type(args).__name__} fields with no ShiftLossArguments equivalent: {', '.join(unknown)}; "
                "leave them at their defaults or find what replaces them in docs/migrating-from-trl.md"
            )
        return cls(**values)


def _liger_without_its_cross_entropy(args: ShiftLossArguments) -> None:
    """``use_liger_kernel=True``: Liger's kernels (RMSNorm, RoPE, SwiGLU) with our loss, never Liger's fused
    cross-entropy, which would replace the model's forward underneath this package's loss (as TRL does)."""
    config = dict(args.liger_kernel_config or {})
    if config.get("fused_linear_cross_entropy"):
        raise ValueError(
            "liger_kernel_config={'fused_linear_cross_entropy': True} would replace the model's forward under this "
            "package's loss; leave it out (Liger's other kernels still apply) and use loss_impl='fused' (the "
            "default 'auto' picks it) for a loss without [batch, seq, vocab] logits"
        )
    args.liger_kernel_config = {**config, "fused_linear_cross_entropy": False}


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
