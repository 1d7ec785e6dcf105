"""Checkpoints of :class:`hf_shift_loss.trainer.ShiftLossTrainer`: ``train`` checks a checkpoint before
resuming and restores the loss metrics saved in it (:mod:`hf_shift_loss.checkpoint`), so a resumed run logs
exactly what the uninterrupted run logs."""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn
from transformers.trainer_utils import get_last_checkpoint

from hf_shift_loss.checkpoint import STATE_KEY, check_checkpoint
from hf_shift_loss.training.metrics import _LossMetrics

DATA_SUMMARY_FILE = "data_summary.json"


class ResumeMixin:
    """``Trainer`` overrides that save the loss metrics with every checkpoint and restore them on resume."""

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """Stock ``Trainer.train``; saves the data summary with the run (``data_summary.json``) and, when
        resuming, first refuses a checkpoint with a missing or unreadable piece
        (:func:`hf_shift_loss.checkpoint.check_checkpoint`), then restores the loss metrics saved in it,
        so the resumed run logs exactly what the uninterrupted run logs (``total_trained_tokens``, the
        per-step window, accuracy)."""
        self._print_run_summary()
        if self.is_world_process_zero() and self.data_stats:
            os.makedirs(self.args.output_dir, exist_ok=True)
            summary = {name: stats.as_dict() if stats else None for name, stats in self.data_stats.items()}
            with open(os.path.join(self.args.output_dir, DATA_SUMMARY_FILE), "w", encoding="utf-8") as file:
                json.dump(summary, file, indent=2)
        self._loss_metrics, self._resumed_window = _LossMetrics(), None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # Trainer raises if None
        if resume_from_checkpoint:
            saved = check_checkpoint(
                resume_from_checkpoint,
                process_index=self.args.process_index,
                world_size=self.args.world_size,
                optimizer_state=not self.args.save_only_model,
                deepspeed=self.is_deepspeed_enabled,
            )
            self._loss_metrics, self._resumed_window = _LossMetrics.from_state(
                saved, self.args.process_index, self.args.world_size, self.args.device
            )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Stock RNG restore; then the stock loss window since the last log line, saved with the checkpoint
        (Trainer itself restarts it at the checkpoint, so the first resumed ``loss`` would miss steps)."""
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and getattr(self, "_resumed_window", None) is not None:
            self._tr_loss.fill_(self._resumed_window["loss_sum"])
            self._globalstep_last_logged = self._resumed_window["last_logged_step"]
            # The closing train_loss stays the mean over this call's steps (stock semantics): the restored
            # steps are drained into the total at the next log line, so they start it below zero.
            self._total_loss_scalar = -self._resumed_window["loss_sum"]

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Stock checkpoint, with the loss metrics of every rank inside its ``trainer_state.json``.

        The state is gathered here, on every rank, and the stock save writes it with the trainer state,
        its last file (:mod:`hf_shift_loss.checkpoint`): a checkpoint is never complete without it.
        """
        self.state.stateful_callbacks[STATE_KEY] = self._loss_metrics.state(
            self.accelerator, self._tr_loss, self._globalstep_last_logged
        )
        super()._save_checkpoint(model, trial)

    def _load_callback_state(self) -> None:
        """Stock restore of callbacks' states; the project's own entry is not a callback's (read in :meth:`train`)."""
        saved = self.state.stateful_callbacks.pop(STATE_KEY, None)
        try:
            super()._load_callback_state()
        finally:
            if saved is not None:
                self.state.stateful_callbacks[STATE_KEY] = saved
