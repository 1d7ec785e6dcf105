"""Evaluation of :class:`hf_shift_loss.trainer.ShiftLossTrainer`: padded evaluation batches and the exact
token-mean ``eval_loss`` (with perplexity) over every rank."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from hf_shift_loss.training.metrics import _MetricWindow

logger = logging.getLogger(__name__)


class EvaluationMixin:
    """``Trainer`` evaluation overrides: padded batches, per-row loss sums gathered without duplicates."""

    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None) -> DataLoader:
        """Stock, but a padding-free batcher pads evaluation batches: one row per example is what makes
        the evaluation loss exact across ranks (the sampler's duplicates are dropped row by row)."""
        with self._padded_batches():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset: Dataset) -> DataLoader:
        """Stock, with padded batches as :meth:`get_eval_dataloader`."""
        with self._padded_batches():
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _padded_batches(self) -> Iterator[None]:
        training_collator, self.data_collator = self.data_collator, self._eval_collator
        try:
            yield
        finally:
            self.data_collator = training_collator

    def _add_eval_rows(self, row_sums: torch.Tensor, row_tokens: torch.Tensor) -> None:
        """Add one eval batch's rows of every rank, without the sampler's padding duplicates.

        Under data parallelism the last batches are completed with rows from the start of the set, so
        that every rank runs as many batches; ``gather_for_metrics`` drops them again.
        """
        rows = torch.stack([row_sums.float(), row_tokens.float()], dim=-1)  # counts < 2**24 per row: exact
        rows = self.accelerator.gather_for_metrics(rows)
        self._eval_sums[0] += rows[:, 0].sum()
        self._eval_sums[1] += rows[:, 1].sum().long()

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
        self._eval_metrics = _MetricWindow()
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
            eval_metrics, self._eval_metrics = self._eval_metrics, None
        output.metrics.update(eval_metrics.pop(self.accelerator, prefix=f"{metric_key_prefix}_"))
        loss_sum, trained_tokens = sums[0], int(sums[1])  # gathered over ranks batch by batch
        if trained_tokens > 0:
            mean_loss = float(loss_sum) / trained_tokens
            perplexity = math.exp(mean_loss) if mean_loss < 700 else math.inf
        else:  # a mean over nothing: NaN, never a 0.0 that reads as a perfect model
            mean_loss = perplexity = math.nan
            logger.warning(
                "%s: the evaluation set has no trained token, so %s_loss is NaN; check its masking "
                "(train_on, train_roles) and max_length",
                metric_key_prefix,
                metric_key_prefix,
            )
        output.metrics[f"{metric_key_prefix}_loss"] = mean_loss
        output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity
        output.metrics[f"{metric_key_prefix}_trained_tokens"] = trained_tokens
        return output
