"""Setup of :class:`hf_shift_loss.trainer.ShiftLossTrainer`: tokenizer and model options, peft, and every
dataset prepared once (encode, mask, truncate, count, pack)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import datasets
from torch import nn

from hf_shift_loss.config import ShiftLossArguments
from hf_shift_loss.data.encode import Encoder, detect_format
from hf_shift_loss.data.formats import apply_trl_dataset_options
from hf_shift_loss.data.load import set_tokenizer_options
from hf_shift_loss.data.prepare import PreparedDataset, dataset_columns, prepare_dataset
from hf_shift_loss.data.stats import DataStats


class DataPreparationMixin:
    """Prepares a dataset once, keeping its statistics and format (``data_stats``, ``_data_formats``)."""

    data_stats: dict[str, DataStats | None]
    _data_formats: dict[str, str]

    def _prepare(
        self,
        args: ShiftLossArguments,
        tokenizer: Any,
        dataset: Any,
        name: str,
        *,
        vocab_size: int | None,
        formatting_func: Callable[[dict[str, Any]], Any] | None,
    ) -> Any:
        if dataset is None:
            return None
        packing = args.packing if name == "train" or args.eval_packing is None else args.eval_packing
        with args.main_process_first(desc=f"preparing the {name} set"):
            dataset = apply_trl_dataset_options(
                dataset,
                formatting_func=formatting_func,
                dataset_text_field=args.dataset_text_field,
                completion_only=args.train_on_for("prompt_completion") == "completion",
                name=name,
            )
            columns = dataset_columns(dataset, name)
            # No column: an empty dataset, which prepare_dataset refuses by name before encoding anything.
            options = (
                args.encoder_options(detect_format(columns)) if columns else {"max_length": args.max_length}
            )
            prepared: PreparedDataset = prepare_dataset(
                dataset,
                Encoder(tokenizer, **options),
                packing=packing,
                packing_overflow=args.packing_overflow,
                on_untrained=args.on_untrained,
                num_proc=args.num_proc,
                name=name,
                vocab_size=vocab_size,
                shuffle_seed=args.seed if args.shuffle_dataset else None,
            )
        self.data_stats[name] = prepared.stats
        self._data_formats[name] = prepared.format
        return prepared.dataset


def _set_tokenizer_and_model_options(tokenizer: Any, model: nn.Module, args: ShiftLossArguments) -> None:
    """TRL's ``eos_token`` and ``chat_template_path``: on the tokenizer, and ``eos_token`` also among the
    model's eos ids (config and generation config), so generation stops where training taught it to."""
    set_tokenizer_options(tokenizer, eos_token=args.eos_token, chat_template_path=args.chat_template_path)
    if args.eos_token is None or not hasattr(model, "config"):
        return
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        ids = generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if tokenizer.eos_token_id not in ids:
            generation_config.eos_token_id = [tokenizer.eos_token_id, *ids]


def _train_split(dataset: Any) -> Any:
    if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
        if "train" not in dataset:
            raise ValueError(
                f"train_dataset is a DatasetDict without a 'train' split (splits: {sorted(dataset)})"
            )
        return dataset["train"]
    return dataset


# peft 0.21's PeftModel reads transformers 5's deprecated ``is_gradient_checkpointing`` alias, which warns.
PEFT_DEPRECATED_ALIAS_WARNING = ".*is_gradient_checkpointing.*deprecated"


def _apply_peft(model: nn.Module, peft_config: Any, gradient_checkpointing: bool) -> nn.Module:
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("the model is already a PeftModel; pass peft_config=None or the base model")
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed LoRA needs inputs that require grad
    with warnings.catch_warnings():
        # Nothing the user can change: pinned by tests/test_pins.py, which fails once it is no longer needed.
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATED_ALIAS_WARNING, category=FutureWarning)
        return get_peft_model(model, peft_config)
