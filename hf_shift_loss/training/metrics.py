"""The metric windows of :class:`hf_shift_loss.trainer.ShiftLossTrainer`: token counts and ``log_metric``'s
values accumulated on the device between log lines, reduced over ranks when logged, saved with checkpoints."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

logger = logging.getLogger(__name__)


class _LossMetrics:
    """Token counts accumulated on device between log lines (no host sync per step); saved with checkpoints.

    Logged under TRL's names where TRL has one (``mean_token_accuracy``, ``num_tokens``, ``entropy``),
    with ours where they add something (``trained_tokens``, ``total_trained_tokens``).
    """

    # The per-window sums, in the order a checkpoint gathers them; the entropy sum is a float, the rest counts.
    _WINDOW = ("trained_tokens", "correct_tokens", "input_tokens", "entropy_sum")

    def __init__(self) -> None:
        self.trained_tokens: torch.Tensor | None = None
        self.correct_tokens: torch.Tensor | None = None
        self.input_tokens: torch.Tensor | None = None
        self.entropy_sum: torch.Tensor | None = None
        self.total_trained_tokens = 0
        self.total_input_tokens = 0
        self.last_logged_step = 0
        self.data_stats_logged = False
        self.custom = _MetricWindow()
        """What a subclass logs with ``ShiftLossTrainer.log_metric``."""

    def state(self, accelerator: Any, loss_window: torch.Tensor, last_logged_step: int) -> dict[str, Any]:
        """What a checkpoint keeps: the totals, and every rank's window since the last log line.

        ``loss_window``: the stock Trainer's on-device loss sum since the last log line (``_tr_loss``).
        Every rank must call it (the windows are gathered).
        """
        device = loss_window.device
        # float64 holds every count exactly (< 2**53) and the float32 entropy sum; -1: no value (all are >= 0).
        values = [getattr(self, name) for name in self._WINDOW]
        window = torch.stack(
            [torch.as_tensor(-1 if value is None else value, device=device).double() for value in values]
        )
        windows = accelerator.gather(window.reshape(1, len(self._WINDOW))).tolist()
        losses = accelerator.gather(loss_window.detach().float().reshape(1)).tolist()
        return {
            "total_trained_tokens": self.total_trained_tokens,
            "total_input_tokens": self.total_input_tokens,
            "last_logged_step": self.last_logged_step,
            "data_stats_logged": self.data_stats_logged,
            "stock_last_logged_step": last_logged_step,
            "ranks": [
                {
                    **{
                        f"window_{name}": None
                        if value < 0
                        else value
                        if name == "entropy_sum"
                        else int(value)
                        for name, value in zip(self._WINDOW, rank_window, strict=True)
                    },
                    "loss_sum": loss,
                }
                for rank_window, loss in zip(windows, losses, strict=True)
            ],
            "window_custom": self.custom.summed_state(accelerator),
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], process_index: int, world_size: int, device: torch.device
    ) -> tuple[_LossMetrics, dict[str, Any]]:
        """This rank's metrics and stock loss window (``loss_sum``, ``last_logged_step``) from :meth:`state`.

        Resumed on another number of ranks, the saved windows are folded: their token counts go to rank
        0 (the log line sums over ranks) and every rank takes their mean loss (the log line averages).
        """
        metrics = cls()
        metrics.total_trained_tokens = int(state["total_trained_tokens"])
        metrics.total_input_tokens = int(state.get("total_input_tokens", 0))  # absent before num_tokens
        metrics.last_logged_step = int(state["last_logged_step"])
        metrics.data_stats_logged = bool(state["data_stats_logged"])
        ranks = state["ranks"]
        if len(ranks) == world_size:
            mine = ranks[process_index]
        else:
            logger.warning(
                "the checkpoint was saved by %d ranks and resumes on %d: the loss window since the last log "
                "line is folded (its token counts on rank 0, its mean loss on every rank)",
                len(ranks),
                world_size,
            )
            mine = {"loss_sum": sum(rank["loss_sum"] for rank in ranks) / len(ranks)}
            for name in cls._WINDOW:
                values = [rank.get(f"window_{name}") for rank in ranks]
                values = [value for value in values if value is not None]
                mine[f"window_{name}"] = sum(values) if values and process_index == 0 else None
        for name in cls._WINDOW:
            value = mine.get(f"window_{name}")
            dtype = torch.float32 if name == "entropy_sum" else torch.long
            setattr(metrics, name, None if value is None else torch.tensor(value, dtype=dtype, device=device))
        # The custom window was summed over ranks when saved: rank 0 takes it, the others the same names at 0.
        metrics.custom = _MetricWindow.from_state(
            state.get("window_custom", {}), device, zero=process_index != 0
        )
        return metrics, {
            "loss_sum": mine["loss_sum"],
            "last_logged_step": int(state["stock_last_logged_step"]),
        }

    def add(
        self,
        trained_tokens: torch.Tensor,
        correct_tokens: torch.Tensor | None,
        input_tokens: torch.Tensor | None = None,
        entropy_sum: torch.Tensor | None = None,
    ) -> None:
        for name, value in zip(
            self._WINDOW, (trained_tokens, correct_tokens, input_tokens, entropy_sum), strict=True
        ):
            if value is not None:
                value = value.to(trained_tokens.device)
                current = getattr(self, name)
                setattr(self, name, value if current is None else current + value)

    def pop(self, accelerator: Any, steps: int) -> dict[str, float]:
        """Reduce over ranks, return the log entries, reset the window. Every rank must call it."""
        if self.trained_tokens is None:
            return {}
        trained = int(accelerator.reduce(self.trained_tokens.clone(), reduction="sum"))
        self.total_trained_tokens += trained
        logs = {"trained_tokens": trained / steps, "total_trained_tokens": float(self.total_trained_tokens)}
        if self.correct_tokens is not None:
            correct = int(accelerator.reduce(self.correct_tokens.clone(), reduction="sum"))
            logs["mean_token_accuracy"] = correct / trained if trained else 0.0
        if self.entropy_sum is not None:
            entropy = float(accelerator.reduce(self.entropy_sum.clone(), reduction="sum"))
            logs["entropy"] = entropy / trained if trained else 0.0
        if self.input_tokens is not None:
            self.total_input_tokens += int(accelerator.reduce(self.input_tokens.clone(), reduction="sum"))
            logs["num_tokens"] = float(self.total_input_tokens)
        self.trained_tokens = self.correct_tokens = self.input_tokens = self.entropy_sum = None
        return logs


class _MetricWindow:
    """``log_metric``'s values since the last log line: per name, the sums of ``value * weight`` and of
    ``weight``, float32 on the device (no host sync per call); reduced over ranks when popped."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # name -> [weighted value sum, weight sum]

    def add(
        self, name: str, value: torch.Tensor | float, weight: torch.Tensor | float, device: torch.device
    ) -> None:
        pair = []
        for what, number in (("value", value), ("weight", weight)):
            number = torch.as_tensor(number).detach() if not torch.is_tensor(number) else number.detach()
            if number.numel() != 1:
                raise ValueError(
                    f"log_metric({name!r}): the {what} must be a number or a one-element tensor, got shape "
                    f"{tuple(number.shape)}; reduce it first (e.g. .mean(), or pass weight=count)"
                )
            pair.append(number.reshape(()).to(device=device, dtype=torch.float32))
        entry = torch.stack([pair[0] * pair[1], pair[1]])
        self.sums[name] = entry if name not in self.sums else self.sums[name] + entry

    def summed_state(self, accelerator: Any) -> dict[str, list[float]]:
        """The window summed over ranks, ``{name: [weighted value sum, weight sum]}``, for a checkpoint (the
        logged means only need the sums). Every rank must call it."""
        names, sums = self._reduced(accelerator)
        return {name: pair for name, pair in zip(names, sums, strict=True)}

    @classmethod
    def from_state(
        cls, state: dict[str, list[float]], device: torch.device, zero: bool = False
    ) -> _MetricWindow:
        """The window of :meth:`summed_state`; with ``zero``, its names with nothing added (other ranks)."""
        window = cls()
        window.sums = {
            name: torch.tensor([0.0, 0.0] if zero else sums, device=device) for name, sums in state.items()
        }
        return window

    def pop(self, accelerator: Any, prefix: str = "") -> dict[str, float]:
        """Reduce over ranks, return ``{prefix + name: weighted mean}``, reset. Every rank must call it."""
        names, sums = self._reduced(accelerator)
        self.sums = {}
        return {
            prefix + name: total / weight if weight != 0 else math.nan
            for name, (total, weight) in zip(names, sums, strict=True)
        }

    def _reduced(self, accelerator: Any) -> tuple[list[str], list[list[float]]]:
        """The names and their sums over every rank (ValueError when the ranks logged different names)."""
        names = sorted(self.sums)
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            per_rank = gather_object([names])
            if any(rank_names != names for rank_names in per_rank):
                raise ValueError(
                    f"log_metric: the ranks logged different names since the last log line ({per_rank}); every "
                    "rank must log the same names (log a 0 with weight=0 where a rank has nothing to add)"
                )
        if not names:
            return [], []
        sums = accelerator.reduce(torch.stack([self.sums[name] for name in names]), reduction="sum")
        return names, sums.tolist()
