"""Trainer wiring: run the model, hand its output to the loss, normalize over the optimizer step.

``ShiftLossTrainer`` is a stock ``transformers.Trainer`` except for the loss. It calls the model
*without* labels (so the model does not compute a second loss over the full logits), then applies
:func:`hf_shift_loss.causal_lm_loss` (or the fused kernel) itself. The normalization rule
(docs/concepts.md):

    loss of one optimizer step = sum of CE over the trained tokens of every micro-batch on every rank
                                 / number of those tokens

Each micro-batch contributes ``sum / global_count``; with ``average_tokens_across_devices`` the
data-parallel gradient average over W ranks is undone by multiplying by W. The update is then the one
of the whole global batch on one device, whatever the batch size, accumulation steps, world size,
padding or packing.

The math lives in ``loss.py`` / ``fused.py``; this module only orchestrates and logs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_shift_loss.fused import fused_linear_cross_entropy, fused_linear_cross_entropy_with_accuracy
from hf_shift_loss.heads import (
    OutputHead,
    UnsupportedOutputHead,
    get_output_head,
    lm_head_returns_hidden_states,
)
from hf_shift_loss.loss import IGNORE_INDEX, causal_lm_loss, count_correct_tokens, count_trained_tokens
from hf_shift_loss.packing import check_packing_support

logger = logging.getLogger(__name__)

__all__ = ["ShiftLossArguments", "ShiftLossTrainer"]

# Batch keys that are targets or bookkeeping, never model inputs.
_TARGET_KEYS = ("labels", "shift_labels")


@dataclass
class ShiftLossArguments(TrainingArguments):
    """``TrainingArguments`` plus the loss options of :class:`ShiftLossTrainer`.

    ``label_smoothing_factor`` (inherited) is passed to the loss. Three inherited defaults change:
    ``remove_unused_columns=False`` (the collator needs the raw ``prompt``/``completion``/``messages``
    columns), ``prediction_loss_only=True`` (evaluation does not gather ``[batch, seq, vocab]``
    logits of every batch) and ``ddp_find_unused_parameters=False``.
    """

    loss_impl: Literal["auto", "eager", "fused"] = field(
        default="auto",
        metadata={
            "help": "'eager': the model computes logits [batch, seq, vocab], then causal_lm_loss. 'fused': "
            "the backbone's hidden states go through fused_linear_cross_entropy with the lm_head weight, "
            "in chunks of trained tokens only (no full logits). 'auto': fused where the model can be split "
            "into backbone and output head, else eager (said once).",
            "choices": ["auto", "eager", "fused"],
        },
    )
    z_loss: float = field(
        default=0.0,
        metadata={"help": "Weight of the z-loss, logsumexp(logits)^2 per trained token (PaLM uses 1e-4)."},
    )
    fused_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per chunk of the fused loss; default: chosen from a memory budget."},
    )
    log_token_accuracy: bool = field(
        default=True,
        metadata={"help": "Log the argmax accuracy over trained tokens with the training loss."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep dataset columns the model does not take: the collator tokenizes them."},
    )
    prediction_loss_only: bool = field(
        default=True,
        metadata={"help": "Evaluation returns the loss only, without gathering full logits."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "find_unused_parameters of DistributedDataParallel. Every parameter of a causal LM gets "
            "a gradient from the loss (the fused path too), so the costly search is off by default."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_impl not in ("auto", "eager", "fused"):
            raise ValueError(f"loss_impl must be 'auto', 'eager' or 'fused', got {self.loss_impl!r}")
        if self.z_loss < 0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise ValueError(f"label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}")
        if self.fused_chunk_size is not None and self.fused_chunk_size < 1:
            raise ValueError(f"fused_chunk_size must be a positive integer, got {self.fused_chunk_size}")


class ShiftLossTrainer(Trainer):
    """``transformers.Trainer`` whose ``compute_loss`` runs the shift / flatten / cross-entropy itself.

    Use it exactly like ``Trainer``; pass :class:`ShiftLossArguments` for the loss options (plain
    ``TrainingArguments`` work too, with the defaults). Training logs add ``token_accuracy`` (argmax
    accuracy over trained tokens), ``trained_tokens`` (per optimizer step, all ranks) and
    ``total_trained_tokens``; evaluation reports the exact token-mean ``eval_loss`` and
    ``eval_perplexity``.
    """

    # compute_loss divides by the trained tokens of the whole optimizer step, so Trainer must not
    # divide again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "ShiftLossTrainer computes the causal-LM loss itself; compute_loss_func would be ignored. "
                "Use transformers.Trainer for a custom loss, or subclass ShiftLossTrainer.compute_loss."
            )
        super().__init__(*args, **kwargs)
        # The stock label smoother would compute a second loss; label_smoothing_factor goes to our loss.
        self.label_smoother = None
        self._loss_metrics = _LossMetrics()
        self._eval_sums: list[torch.Tensor] | None = None
        self._output_heads: dict[int, OutputHead | None] = {}

    # ------------------------------------------------------------------ options
    def _option(self, name: str, default: Any) -> Any:
        return getattr(self.args, name, default)

    # ------------------------------------------------------------------ normalization
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Trained tokens of one optimizer step: every micro-batch, and every rank when averaging.

        Counted after the shift (the first label of a row is never a target), or on ``shift_labels``
        when the collator provides pre-shifted targets.
        """
        if not batch_samples or not any(
            key in batch for batch in batch_samples for key in _TARGET_KEYS if isinstance(batch, dict)
        ):
            return None
        trained_tokens = sum(_count_batch_trained_tokens(batch).to(device) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            trained_tokens = self.accelerator.gather(trained_tokens.reshape(1)).sum()
        return trained_tokens

    def _data_parallel_scale(self) -> int:
        """Factor that undoes the data-parallel gradient mean when the loss uses the global count."""
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            return self.accelerator.num_processes
        return 1

    # ------------------------------------------------------------------ eager or fused
    def output_head(self, model: nn.Module) -> OutputHead | None:
        """The head the fused loss uses for ``model``, or None for the eager path (decided once per model).

        ``loss_impl="eager"`` never fuses. ``"auto"`` and ``"fused"`` fuse when the model splits into a
        backbone and a plain linear head (:func:`hf_shift_loss.heads.get_output_head`) and the head's
        full weight is visible; otherwise they fall back to eager and say why, once.
        """
        unwrapped = self.accelerator.unwrap_model(model)
        key = id(unwrapped)
        if key in self._output_heads:
            return self._output_heads[key]
        loss_impl = self._option("loss_impl", "eager")
        head: OutputHead | None = None
        if loss_impl != "eager":
            reason = None
            if self.is_fsdp_enabled:
                # FSDP shards the lm_head weight between forward passes; the fused loss would see a shard.
                reason = "FSDP shards the lm_head weight, and the fused loss needs the full weight"
            else:
                try:
                    head = get_output_head(unwrapped)
                except UnsupportedOutputHead as error:
                    reason = str(error)
            if head is None:
                logger.warning(
                    "loss_impl=%r: using the eager loss (full logits) because %s.", loss_impl, reason
                )
            else:
                logger.info(
                    "loss_impl=%r: fused linear + cross-entropy on %s.", loss_impl, type(unwrapped).__name__
                )
        self._output_heads[key] = head
        return head

    def _hidden_states_and_head(
        self, model: nn.Module, model_inputs: dict[str, Any], head: OutputHead
    ) -> tuple[torch.Tensor, Any]:
        """Run the (wrapped) model with its lm_head as the identity: its "logits" are the hidden states.

        The wrapped model is called, not its backbone, so DDP's gradient hooks, peft and accelerate see
        the whole forward; the ``[batch, seq, vocab]`` logits are never computed.
        """
        with lm_head_returns_hidden_states(head):
            outputs = model(**model_inputs)
        hidden = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        # Model parallel: the head may live on another device than the last decoder layer.
        return hidden.to(head.weight.device), outputs

    # ------------------------------------------------------------------ the loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Run the model without labels, then the causal-LM loss normalized over the optimizer step.

        Args:
            model: the (possibly wrapped: DDP, peft) causal LM.
            inputs: ``input_ids`` ``[batch, seq]``, ``attention_mask`` or ``position_ids``, and ``labels``
                ``[batch, seq]`` aligned with ``input_ids`` (or pre-shifted ``shift_labels``).
            num_items_in_batch: trained tokens of the optimizer step (all micro-batches, all ranks), from
                :meth:`_get_num_items_in_batch`.
        """
        model_inputs = {key: value for key, value in inputs.items() if key not in _TARGET_KEYS}
        if "shift_labels" in inputs:
            targets, shift = inputs["shift_labels"], False
        elif "labels" in inputs:
            targets, shift = inputs["labels"], True
        else:
            raise ValueError(
                f"ShiftLossTrainer needs 'labels' (or pre-shifted 'shift_labels') in the batch, got keys "
                f"{sorted(inputs)}; use hf_shift_loss.PromptMaskingCollator or add labels in your collator"
            )
        training = model.training
        if "position_ids" in model_inputs and "attention_mask" not in model_inputs:
            # A packed batch: transformers builds the block-diagonal mask only without a KV cache, and
            # some attention backends would attend across sequences: refuse those, saying why.
            model_inputs["use_cache"] = False
            check_packing_support(
                self.accelerator.unwrap_model(model), model_inputs["position_ids"], use_cache=False
            )
        loss_options = {
            "shift": shift,
            "ignore_index": IGNORE_INDEX,
            "label_smoothing": self.args.label_smoothing_factor,
            "z_loss": self._option("z_loss", 0.0),
        }
        head = self.output_head(model)
        if head is not None:
            hidden, outputs = self._hidden_states_and_head(model, model_inputs, head)
            chunk_size = self._option("fused_chunk_size", None)

            def loss_and_correct(
                reduction: str, denominator: Any, count_correct: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
                fused_loss = (
                    fused_linear_cross_entropy_with_accuracy if count_correct else fused_linear_cross_entropy
                )
                result = fused_loss(
                    hidden,
                    head.weight,
                    targets,
                    bias=head.bias,
                    reduction=reduction,
                    num_items_in_batch=denominator,
                    chunk_size=chunk_size,
                    **loss_options,
                )
                return result if count_correct else (result, None)

            # The outputs' "logits" are hidden states here: hand the caller the outputs without them.
            if isinstance(outputs, dict):
                outputs = type(outputs)(**{key: value for key, value in outputs.items() if key != "logits"})
        else:
            outputs = model(**model_inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]

            def loss_and_correct(
                reduction: str, denominator: Any, count_correct: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
                loss = causal_lm_loss(
                    logits, targets, reduction=reduction, num_items_in_batch=denominator, **loss_options
                )
                # The argmax is another pass over [batch, seq, vocab]: only when the accuracy is logged.
                correct = (
                    count_correct_tokens(logits.detach(), targets, shift=shift) if count_correct else None
                )
                return loss, correct

        if training:
            loss, correct = loss_and_correct(
                "mean", num_items_in_batch, self._option("log_token_accuracy", True)
            )
            if num_items_in_batch is None:
                # Called outside Trainer's step loop: a per-micro-batch mean, scaled for accumulation.
                loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
            else:
                loss = loss * self._data_parallel_scale()
            self._loss_metrics.add(count_trained_tokens(targets, shift=shift).to(loss.device), correct)
        else:
            # Evaluation: accumulate sum and count so eval_loss is the exact token mean of the eval set.
            loss_sum, _ = loss_and_correct("sum", None, count_correct=False)
            trained_tokens = count_trained_tokens(targets, shift=shift).to(loss_sum.device)
            if self._eval_sums is not None:
                self._eval_sums[0] += loss_sum.detach()
                self._eval_sums[1] += trained_tokens
            loss = loss_sum / trained_tokens.clamp(min=1)

        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss metrics to the training log lines (reduced over all ranks)."""
        if "loss" in logs and "eval_loss" not in logs:
            steps = self.state.global_step - self._loss_metrics.last_logged_step
            logs.update(self._loss_metrics.pop(self.accelerator, max(steps, 1)))
            self._loss_metrics.last_logged_step = self.state.global_step
            stats = getattr(self.data_collator, "stats", None)
            if stats is not None and hasattr(stats, "untrained_examples"):
                logs["dropped_examples"] = float(stats.untrained_examples)
                logs["truncated_tokens"] = float(stats.truncated_tokens)
            packing_stats = getattr(self.data_collator, "packing_stats", None)
            if getattr(self.data_collator, "packing", False) and packing_stats is not None:
                logs["packing_fill"] = packing_stats.fill
                logs["packing_truncated_tokens"] = float(packing_stats.truncated_tokens)
                logs["packing_lost_boundary_targets"] = float(packing_stats.lost_boundary_targets)
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """Stock evaluation, with ``eval_loss`` replaced by the exact token mean and perplexity added.

        The stock loop averages per-batch means, which weighs a batch of 3 trained tokens like a batch
        of 3000; here every trained token of the evaluation set weighs the same, on every rank.
        """
        device = self.args.device
        self._eval_sums = [torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)]
        try:
            output = super().evaluation_loop(
                dataloader,
                description,
                prediction_loss_only=prediction_loss_only,
                ignore_keys=ignore_keys,
                metric_key_prefix=metric_key_prefix,
            )
        finally:
            sums, self._eval_sums = self._eval_sums, None
        prefix = metric_key_prefix
        loss_sum = self.accelerator.reduce(sums[0].clone(), reduction="sum")
        trained_tokens = self.accelerator.reduce(sums[1].clone(), reduction="sum")
        if int(trained_tokens) > 0:
            mean_loss = float(loss_sum) / int(trained_tokens)
            output.metrics[f"{prefix}_loss"] = mean_loss
            output.metrics[f"{prefix}_perplexity"] = math.exp(mean_loss) if mean_loss < 700 else math.inf
            output.metrics[f"{prefix}_trained_tokens"] = int(trained_tokens)
        return output


def _count_batch_trained_tokens(batch: dict[str, Any]) -> torch.Tensor:
    if "shift_labels" in batch:
        return count_trained_tokens(batch["shift_labels"], shift=False)
    return count_trained_tokens(batch["labels"], shift=True)


class _LossMetrics:
    """Token counts accumulated on device between log lines (no host sync per step)."""

    def __init__(self) -> None:
        self.trained_tokens: torch.Tensor | None = None
        self.correct_tokens: torch.Tensor | None = None
        self.total_trained_tokens = 0
        self.last_logged_step = 0

    def add(self, trained_tokens: torch.Tensor, correct_tokens: torch.Tensor | None) -> None:
        self.trained_tokens = (
            trained_tokens if self.trained_tokens is None else self.trained_tokens + trained_tokens
        )
        if correct_tokens is not None:
            correct_tokens = correct_tokens.to(trained_tokens.device)
            self.correct_tokens = (
                correct_tokens if self.correct_tokens is None else self.correct_tokens + correct_tokens
            )

    def pop(self, accelerator: Any, steps: int) -> dict[str, float]:
        """Reduce over ranks, return the log entries, reset the window. Every rank must call it."""
        if self.trained_tokens is None:
            return {}
        counts = [self.trained_tokens, self.correct_tokens if self.correct_tokens is not None else None]
        trained = int(accelerator.reduce(counts[0].clone(), reduction="sum"))
        self.total_trained_tokens += trained
        logs = {
            "trained_tokens": trained / steps,
            "total_trained_tokens": float(self.total_trained_tokens),
        }
        if counts[1] is not None:
            correct = int(accelerator.reduce(counts[1].clone(), reduction="sum"))
            logs["token_accuracy"] = correct / trained if trained else 0.0
        self.trained_tokens = None
        self.correct_tokens = None
        return logs
