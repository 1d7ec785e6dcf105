"""``ShiftLossTrainer``: a ``transformers.Trainer`` that prepares the data, runs the loss, normalizes it.

What it adds to the stock Trainer, in the order of a run:

1. Setup (``__init__``): a model given by name is loaded, a ``peft_config`` applied, and every dataset
   without a ``data_collator`` prepared once (:func:`hf_shift_loss.data.prepare_dataset`: encode, mask,
   truncate, count, pack) and batched by :class:`hf_shift_loss.data.Batcher`.
2. The loss (``compute_loss``): the model runs without labels; the loss path chosen once per model
   (:mod:`hf_shift_loss.loss.paths`, eager or fused) computes the shifted cross-entropy, normalized
   over every trained token of the optimizer step (docs/concepts.md)::

       loss of one optimizer step = sum of CE over the trained tokens of every micro-batch on every rank
                                    / number of those tokens

   Each micro-batch contributes ``sum / global_count``; with ``average_tokens_across_devices`` the
   data-parallel gradient average over W ranks is undone by multiplying by W.
3. Logs: token accuracy (``mean_token_accuracy``), input tokens seen (``num_tokens``) and trained tokens
   per step (reduced over ranks), the data statistics, and an
   exact token-mean ``eval_loss`` with perplexity.

A subclass changes the loss without copying ``compute_loss`` (docs/extending.md): :meth:`token_loss`
(a per-token loss, decided once: is it overridden?), ``loss_weights`` in the batch, ``outputs.last_hidden_state``
for auxiliary terms, and :meth:`log_metric` for its own log entries.

The math lives in ``hf_shift_loss.loss``; this module only orchestrates and logs. The groups of ``Trainer``
overrides it mixes in (setup, normalization, evaluation, resume, model card) live in :mod:`hf_shift_loss.training`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_shift_loss.config import ShiftLossArguments
from hf_shift_loss.data.batch import Batcher, resolve_pad_token_id
from hf_shift_loss.data.load import load_tokenizer
from hf_shift_loss.data.pack import check_packing_support
from hf_shift_loss.data.stats import DataStats
from hf_shift_loss.loss import EagerLoss, FusedLoss, choose_loss_path, count_trained_tokens
from hf_shift_loss.model_card import MODEL_TAGS
from hf_shift_loss.training.card import ModelCardMixin
from hf_shift_loss.training.evaluation import EvaluationMixin
from hf_shift_loss.training.metrics import _LossMetrics, _MetricWindow
from hf_shift_loss.training.normalization import (
    _LOSS_KEYS,
    NormalizationMixin,
    _count_input_tokens,
    _targets,
)
from hf_shift_loss.training.resume import DATA_SUMMARY_FILE as DATA_SUMMARY_FILE
from hf_shift_loss.training.resume import ResumeMixin
from hf_shift_loss.training.setup import (
    PEFT_DEPRECATED_ALIAS_WARNING as PEFT_DEPRECATED_ALIAS_WARNING,
)
from hf_shift_loss.training.setup import (
    DataPreparationMixin,
    _apply_peft,
    _set_tokenizer_and_model_options,
    _train_split,
)

__all__ = ["ShiftLossArguments", "ShiftLossTrainer"]
# Imported `as` themselves: DATA_SUMMARY_FILE and PEFT_DEPRECATED_ALIAS_WARNING lived here, and still import
# from here (as _LossMetrics and _apply_peft, which this module uses).

logger = logging.getLogger(__name__)

# What the trainer (and the stock Trainer) log themselves: log_metric refuses these names.
_BUILT_IN_LOG_NAMES = frozenset(
    {
        "loss",
        "grad_norm",
        "learning_rate",
        "epoch",
        "step",
        "num_input_tokens_seen",
        "trained_tokens",
        "total_trained_tokens",
        "mean_token_accuracy",
        "num_tokens",
        "entropy",
    }
)


class ShiftLossTrainer(
    DataPreparationMixin, NormalizationMixin, EvaluationMixin, ResumeMixin, ModelCardMixin, Trainer
):
    """``transformers.Trainer`` whose ``compute_loss`` runs the shift / flatten / cross-entropy itself.

    Args:
        model: a causal LM, or a hub id / local path loaded with ``AutoModelForCausalLM``
            (``args.model_init_kwargs`` are passed to ``from_pretrained``).
        args: :class:`ShiftLossArguments`; a plain ``TrainingArguments`` is converted once.
        data_collator: batches raw rows yourself; without one, every dataset is prepared here.
        train_dataset / eval_dataset: ``datasets.Dataset``, ``IterableDataset``, a ``DatasetDict``
            (its ``"train"`` split for training; every split for evaluation) or a dict of datasets for
            evaluation. Rows in any format of :mod:`hf_shift_loss.data.encode`.
        processing_class: the tokenizer; optional when ``model`` is a name.
        peft_config: a peft config (e.g. ``LoraConfig``) applied to the model.
        formatting_func: as in TRL, ``row -> text`` (or ``-> messages``) applied to every raw row
            before it is encoded (:func:`hf_shift_loss.data.formats.apply_trl_dataset_options`).
        **kwargs: the other ``Trainer`` arguments (callbacks, optimizers, ...).

    Examples:
        >>> from datasets import Dataset  # doctest: +SKIP
        >>> trainer = ShiftLossTrainer(
        ...     model="HuggingFaceTB/SmolLM2-135M-Instruct",
        ...     args=ShiftLossArguments(output_dir="out", max_length=1024, packing=True),
        ...     train_dataset=Dataset.from_list([{"prompt": "2+2=", "completion": "4"}] * 64),
        ... )  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    # compute_loss divides by the trained tokens of the whole optimizer step, so Trainer must not
    # divide again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | str,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        formatting_func: Callable[[dict[str, Any]], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "ShiftLossTrainer computes the causal-LM loss itself; compute_loss_func would be ignored. "
                "Use transformers.Trainer for a custom loss, or subclass ShiftLossTrainer.compute_loss."
            )
        args = ShiftLossArguments.from_training_arguments(args)
        if isinstance(model, str):
            model_init_kwargs = args.model_init_kwargs or {}
            if processing_class is None:
                processing_class = load_tokenizer(
                    model, trust_remote_code=bool(model_init_kwargs.get("trust_remote_code"))
                )
            model = AutoModelForCausalLM.from_pretrained(model, **model_init_kwargs)
        if processing_class is not None:
            _set_tokenizer_and_model_options(processing_class, model, args)
        if peft_config is not None:
            model = _apply_peft(model, peft_config, args.gradient_checkpointing)
        self.data_stats: dict[str, DataStats | None] = {}
        self._data_formats: dict[str, str] = {}
        if formatting_func is not None and data_collator is not None:
            raise ValueError(
                "formatting_func applies when the trainer prepares the datasets, but a data_collator is given (it "
                "gets the raw rows): apply the function in the collator or with dataset.map, or drop the collator"
            )
        if data_collator is None and (train_dataset is not None or eval_dataset is not None):
            if processing_class is None:
                raise ValueError(
                    "ShiftLossTrainer needs processing_class (the tokenizer) to prepare the datasets, or a "
                    "data_collator that batches them"
                )
            data_collator = Batcher(
                resolve_pad_token_id(processing_class),
                args.pad_to_multiple_of,
                padding_free=args.padding_free,
            )
            embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            prepare = functools.partial(
                self._prepare,
                args,
                processing_class,
                vocab_size=getattr(embeddings, "num_embeddings", None),
                formatting_func=formatting_func,
            )
            train_dataset = prepare(_train_split(train_dataset), "train")
            if isinstance(eval_dataset, dict):
                eval_dataset = {key: prepare(value, f"eval:{key}") for key, value in eval_dataset.items()}
            else:
                eval_dataset = prepare(eval_dataset, "eval")
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if hasattr(self.model, "add_model_tags"):  # pushed models carry them, as TRL's "trl", "sft"
            self.model.add_model_tags(list(MODEL_TAGS))
        # The stock label smoother would compute a second loss; label_smoothing_factor goes to our loss.
        self.label_smoother = None
        self._loss_metrics = _LossMetrics()
        self._eval_sums: list[torch.Tensor] | None = None
        self._loss_paths: dict[int, EagerLoss | FusedLoss] = {}
        self._normalization_problem: str | None = None  # why training steps cannot be counted, once known
        # The per-token loss hook, decided once: an overridden token_loss makes the loss per-token.
        self._token_loss = self.token_loss if _overrides(type(self), "token_loss") else None
        self._eval_metrics: _MetricWindow | None = None  # log_metric's window while evaluating
        # A padding-free batcher pads evaluation batches: decided once, here.
        collator = self.data_collator
        self._eval_collator = (
            dataclasses.replace(collator, padding_free=False)
            if isinstance(collator, Batcher) and collator.padding_free
            else collator
        )
        if self.compute_metrics is not None and self.args.prediction_loss_only:
            logger.warning(
                "compute_metrics will not be called: prediction_loss_only=True (ShiftLossArguments' default, so "
                "that evaluation does not gather [batch, seq, vocab] logits); pass prediction_loss_only=False "
                "to call it (evaluation then uses the eager loss, whose logits it needs)"
            )

    def _print_run_summary(self) -> None:
        """Print :meth:`run_summary` once per job (``accelerator.print`` alone prints once per node)."""
        if self.is_world_process_zero():
            self.accelerator.print(self.run_summary())

    def run_summary(self) -> str:
        """What this run will do, in a few lines: the loss path and why, what is trained, packing,
        normalization, and each prepared dataset's counts. Printed once when training starts."""
        args = self.args
        path = self.loss_path(self.model)
        if path.name == "fused":
            loss = "fused lm_head + cross-entropy in chunks of trained tokens (no [batch, seq, vocab] logits)"
        else:
            loss = f"eager: full logits, then causal_lm_loss ({path.reason})"
        trained = {
            "completion": f"the completion / every {'+'.join(args.train_roles)} turn",
            "last_turn": f"the last {'+'.join(args.train_roles)} turn only",
            "all": "every token",
        }[args.train_on]
        ranks = args.world_size if args.average_tokens_across_devices else 1
        if self.data_stats:
            data = [
                f"trained: {trained}; end-of-turn tokens: {args.train_end_of_turn}; max_length {args.max_length}",
                f"packing: {f'on, rows of {args.max_length} tokens' if args.packing else 'off'}; batches: "
                f"{'padding-free, one row per micro-batch' if args.padding_free else 'rows padded to the longest'}",
            ]
        else:
            data = [
                "trained, packing: as the given data_collator makes the batches (datasets not prepared here)"
            ]
        normalization = (
            f"normalization: sum of CE over the trained tokens of each optimizer step "
            f"({args.gradient_accumulation_steps} micro-batch(es) x {ranks} rank(s)) / their number"
        )
        if self._normalization_problem is not None:
            normalization = f"normalization: NOT exact {self._normalization_problem}"
        elif not self.data_stats:
            normalization += ", counted from the labels of each batch the data_collator returns"
        lines = [f"loss: {loss}", *data, normalization]
        for name, stats in self.data_stats.items():
            counts = stats.summary() if stats is not None else "streamed: counted as rows are read"
            lines.append(f"{name} set ({self._data_formats[name]}): {counts}")
        return "\n".join(["[hf_shift_loss] run summary", *("  " + line for line in lines)])

    # ------------------------------------------------------------------ the loss path
    def loss_path(self, model: nn.Module) -> EagerLoss | FusedLoss:
        """The loss path for ``model``, chosen once per model (:func:`hf_shift_loss.loss.choose_loss_path`)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if id(unwrapped) not in self._loss_paths:
            self._loss_paths[id(unwrapped)] = choose_loss_path(
                unwrapped,
                self.args.loss_impl,
                label_smoothing=self.args.label_smoothing_factor,
                z_loss=self.args.z_loss,
                chunk_size=self.args.fused_chunk_size,
                fsdp_version=self._fsdp_version(),
                zero3=self._zero3_config(),
                loss_type=self.args.loss_type,
                sync_free=self.args.torch_compile
                if self.args.fused_sync_free is None
                else self.args.fused_sync_free,
            )
        return self._loss_paths[id(unwrapped)]

    def _fsdp_version(self) -> int | None:
        if not self.is_fsdp_enabled:
            return None
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return int(getattr(plugin, "fsdp_version", 1) or 1)

    def _zero3_config(self) -> dict | None:
        """DeepSpeed's ``zero_optimization`` section when ZeRO stage 3 runs, else None."""
        plugin = (
            getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        )
        zero = (plugin.deepspeed_config if plugin is not None else {}).get("zero_optimization", {})
        return zero if zero.get("stage") == 3 else None

    # ------------------------------------------------------------------ the loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Run the model without labels, then the causal-LM loss normalized over the optimizer step.

        ``inputs``: ``input_ids`` ``[batch, seq]``, ``attention_mask`` or (packed) ``position_ids``,
        ``labels`` aligned with ``input_ids`` (or pre-shifted ``shift_labels``), and optional
        ``loss_weights`` ``[batch, seq]`` aligned with ``labels`` (training multiplies each trained token's
        loss by its weight; the evaluation loss stays the plain cross-entropy). ``num_items_in_batch``:
        trained tokens of the optimizer step, all micro-batches and ranks (None outside the step loop).

        With ``return_outputs=True`` the model's outputs come back with ``last_hidden_state``
        ``[batch, seq, hidden]`` (the lm_head's input) on both loss paths; on the fused path they have no
        logits, and reading ``outputs.logits`` raises :class:`hf_shift_loss.loss.LogitsNotComputedError`.

        Examples:
            An auxiliary term in a subclass, on either loss path (docs/extending.md runs it):

            >>> class Regularized(ShiftLossTrainer):  # doctest: +SKIP
            ...     def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ...         loss, outputs = super().compute_loss(
            ...             model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            ...         loss = loss + 1e-3 * outputs.last_hidden_state.float().pow(2).mean()
            ...         return (loss, outputs) if return_outputs else loss
        """
        targets, shift = _targets(inputs)
        model_inputs = {key: value for key, value in inputs.items() if key not in _LOSS_KEYS}
        if "position_ids" in model_inputs and "attention_mask" not in model_inputs:
            model_inputs["use_cache"] = False  # packed: the block-diagonal mask is only built without a cache
            check_packing_support(
                self.accelerator.unwrap_model(model), model_inputs["position_ids"], use_cache=False
            )
        training = model.training
        path = self.loss_path(model)
        if not training and not self.args.prediction_loss_only:  # compute_metrics needs the logits
            path = EagerLoss(path.label_smoothing, path.z_loss, path.router_aux_loss_coef, path.loss_type)
        loss, correct, outputs, router_loss, entropy_sum = path(
            model,
            model_inputs,
            targets,
            shift=shift,
            reduction="mean" if training else "none",
            num_items_in_batch=num_items_in_batch if training else None,
            count_correct=training and self.args.log_token_accuracy,
            measure_entropy=training and self.args.log_entropy,
            loss_weights=inputs["loss_weights"] if training and "loss_weights" in inputs else None,
            token_loss=self._token_loss if training else None,
        )
        trained_tokens = count_trained_tokens(targets, shift=shift, per_row=True).to(loss.device)
        if not training:  # evaluation: per-row sums and counts, for the exact token mean of the eval set
            row_sums = loss.detach().reshape(trained_tokens.shape[0], -1).sum(-1)
            if self._eval_sums is not None:
                self._add_eval_rows(row_sums, trained_tokens)
            loss = row_sums.sum() / trained_tokens.sum().clamp(min=1)
        elif num_items_in_batch is None:  # outside the step loop: a micro-batch mean, scaled for accumulation
            loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        else:
            loss = loss * self._data_parallel_scale()  # undo DDP's gradient mean: the count is global
        if training and router_loss is not None:  # MoE: as the model adds it, averaged over micro-batches
            loss = loss + router_loss / getattr(self, "current_gradient_accumulation_steps", 1)
        if training:
            self._loss_metrics.add(
                trained_tokens.sum(), correct, _count_input_tokens(model_inputs), entropy_sum
            )
        return (loss, outputs) if return_outputs else loss

    def token_loss(self, token_losses: torch.Tensor) -> torch.Tensor:
        """The per-token loss hook: override it to change each trained token's loss; returns it unchanged.

        The trainer sums what it returns (times the batch's ``loss_weights``, if any) and divides by the
        trained tokens of the optimizer step, so a custom token loss keeps the exact normalization under
        gradient accumulation and data parallelism, and runs on the fused path without full logits (the
        fused loss then returns per-token losses and recomputes its logits in backward). Whether the hook
        is overridden is decided once, when the trainer is built; not overridden, the loss is reduced in
        one pass. Training only: ``eval_loss`` stays the plain cross-entropy (and its perplexity).

        Args:
            token_losses: float32 ``[trained]``, the loss of each trained token of the micro-batch, row by
                row, differentiable. It is the cross-entropy ``-log p(target)`` (so ``p = exp(-loss)``)
                unless ``label_smoothing_factor`` or ``z_loss`` add their terms to it, or
                ``loss_type="dft"`` multiplies it by its detached ``p``.

        Returns:
            ``[trained]`` float values, one per token (a ValueError names any other shape).

        Examples:
            Focal loss (gamma 2): confident tokens count less.

            >>> class FocalTrainer(ShiftLossTrainer):
            ...     def token_loss(self, token_losses):
            ...         target_probability = torch.exp(-token_losses)
            ...         return (1 - target_probability) ** 2 * token_losses
        """
        return token_losses

    def log_metric(self, name: str, value: torch.Tensor | float, weight: torch.Tensor | float = 1.0) -> None:
        """Log ``name`` with the next log line: the ``weight``-ed mean of its values over the window, all ranks.

        Call it from a subclass (in ``compute_loss``, ``token_loss``, ...) once per micro-batch, with a
        0-dim tensor; it is added up on the device (no host sync) and reduced over ranks only when the
        trainer logs, like ``mean_token_accuracy``. Logged: ``sum(value * weight) / sum(weight)`` over every call
        since the last log line on every rank (``weight=trained_tokens`` gives a token mean). Called
        during evaluation, it goes to the evaluation's metrics as ``eval_<name>``. Every rank must log the
        same names (a ValueError says which differ).

        Args:
            name: the log entry's name; not one the trainer logs itself (``loss``, ``mean_token_accuracy``, ...).
            value: a number or a one-element tensor (detached here: logging never trains).
            weight: how much this value counts in the mean (a number or a one-element tensor).

        Examples:
            >>> class LoggingTrainer(ShiftLossTrainer):
            ...     def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ...         loss, outputs = super().compute_loss(
            ...             model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            ...         self.log_metric("hidden_norm", outputs.last_hidden_state.detach().norm(dim=-1).mean())
            ...         return (loss, outputs) if return_outputs else loss
        """
        if not isinstance(name, str) or not name or name in _BUILT_IN_LOG_NAMES or name.startswith("eval_"):
            raise ValueError(
                f"log_metric name {name!r}: give a non-empty name that is not one the trainer logs itself "
                f"({', '.join(sorted(_BUILT_IN_LOG_NAMES))}) and does not start with 'eval_' (evaluation adds it)"
            )
        window = self._eval_metrics if self._eval_metrics is not None else self._loss_metrics.custom
        window.add(name, value, weight, self.args.device)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss metrics (reduced over all ranks) and, once per run, the train set's data counts."""
        if "loss" in logs and "eval_loss" not in logs:
            steps = self.state.global_step - self._loss_metrics.last_logged_step
            logs.update(self._loss_metrics.pop(self.accelerator, max(steps, 1)))
            logs.update(self._loss_metrics.custom.pop(self.accelerator))
            self._loss_metrics.last_logged_step = self.state.global_step
            train_stats = self.data_stats.get("train")
            if train_stats is not None and not self._loss_metrics.data_stats_logged:
                logs.update(train_stats.log_entries("data"))
                self._loss_metrics.data_stats_logged = True
        super().log(logs, start_time)


def _overrides(cls: type, name: str) -> bool:
    """Whether ``cls`` (a ShiftLossTrainer subclass) defines its own ``name``."""
    return getattr(cls, name) is not getattr(ShiftLossTrainer, name)
