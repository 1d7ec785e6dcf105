"""Where the loss paths were documented: now :mod:`hf_shift_loss.loss.paths`. This path keeps working."""

from hf_shift_loss.loss.paths import EagerLoss, FusedLoss, LossResult, choose_loss_path

__all__ = ["EagerLoss", "FusedLoss", "LossResult", "choose_loss_path"]
