"""Normalization of :class:`hf_shift_loss.trainer.ShiftLossTrainer`: the trained tokens of an optimizer step
(every micro-batch on every rank), counted from the batch's targets, and what undoes the data-parallel mean."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from hf_shift_loss.loss import count_trained_tokens

logger = logging.getLogger(__name__)

# Batch keys that are targets, never model inputs; the loss also takes the weights of the targets.
_TARGET_KEYS = ("labels", "shift_labels")
_LOSS_KEYS = (*_TARGET_KEYS, "loss_weights")


class NormalizationMixin:
    """``Trainer`` overrides and helpers that count the trained tokens of an optimizer step."""

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Trained tokens of one optimizer step: every micro-batch, and every rank when averaging.

        Counted after the shift (the first label of a row is never a target), or on ``shift_labels``
        when the collator provides pre-shifted targets, in any mapping a collator returns (a ``dict``,
        ``transformers.BatchEncoding``, ...). A step whose batches cannot be counted (on any rank) is
        said once, and the run summary stops claiming exact normalization (:meth:`_uncounted`).
        """
        counts, problem = [], None
        for batch in batch_samples:
            if not isinstance(batch, Mapping) or not any(key in batch for key in _TARGET_KEYS):
                keys = sorted(batch) if isinstance(batch, Mapping) else "none: not a mapping"
                problem = (
                    f"a micro-batch of type {type(batch).__name__} (keys: {keys}) has no labels to count"
                )
                break
            counts.append(_count_batch_trained_tokens(batch).to(device))
        if not batch_samples:
            problem = "the step has no micro-batch"
        trained_tokens = sum(counts) if problem is None else torch.tensor(-1, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # Every rank gathers, countable or not (a rank that skipped the gather would hang the others).
            gathered = self.accelerator.gather(torch.as_tensor(trained_tokens, device=device).reshape(1))
            if problem is None and bool((gathered < 0).any()):
                problem = "another rank's micro-batches cannot be counted (see its warning)"
            trained_tokens = gathered.sum()
        if problem is not None:
            self._uncounted(problem)
            return None
        return trained_tokens

    def _uncounted(self, problem: str) -> None:
        """Say once that training steps are no longer normalized exactly, and why (run summary + warning)."""
        if not self.model.training or self._normalization_problem is not None:
            return  # evaluation sums its rows itself; a training problem is said once
        self._normalization_problem = f"from step {self.state.global_step + 1}, {problem}"
        logger.warning(
            "normalization is not exact %s; such a step's loss is the mean of its micro-batches' token means. "
            "Return a mapping (dict or BatchEncoding) with 'labels' or 'shift_labels' from the data_collator",
            self._normalization_problem,
        )
        self._print_run_summary()

    def _data_parallel_scale(self) -> int:
        """Factor that undoes the data-parallel gradient mean when the loss uses the global count."""
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            return self.accelerator.num_processes
        return 1


def _targets(batch: Mapping[str, Any]) -> tuple[torch.Tensor, bool]:
    """``(targets, shift)``: pre-shifted ``shift_labels`` as they are, else ``labels`` to be shifted."""
    if "shift_labels" in batch:
        return batch["shift_labels"], False
    if "labels" in batch:
        return batch["labels"], True
    raise ValueError(
        f"ShiftLossTrainer needs 'labels' (or pre-shifted 'shift_labels') in the batch, got keys {sorted(batch)}; "
        "let the trainer prepare the dataset (no data_collator), or add labels in your collator"
    )


def _count_input_tokens(model_inputs: Mapping[str, Any]) -> torch.Tensor:
    """Input tokens of a batch (TRL's ``num_tokens``): the attended ones of padded rows; every position of
    packed or padding-free rows (their only padding is what ``pad_to_multiple_of`` or the batch's longest
    packed row adds)."""
    if "attention_mask" in model_inputs:
        return model_inputs["attention_mask"].sum()
    reference = model_inputs.get("position_ids", model_inputs["input_ids"])
    return torch.tensor(reference.numel(), device=reference.device)


def _count_batch_trained_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    targets, shift = _targets(batch)
    return count_trained_tokens(targets, shift=shift)
