"""The pieces of :class:`hf_shift_loss.trainer.ShiftLossTrainer`, one responsibility per module.

``trainer.py`` is the orchestrator (setup, ``compute_loss``, the loss path, logging); here:

- ``setup.py``: model and tokenizer options, peft, the datasets prepared once (``DataPreparationMixin``).
- ``normalization.py``: the trained tokens of an optimizer step (``NormalizationMixin``) and the batch's
  target keys.
- ``metrics.py``: the on-device metric windows between log lines, and their checkpoint state.
- ``evaluation.py``: padded evaluation batches and the exact token-mean ``eval_loss`` (``EvaluationMixin``).
- ``resume.py``: ``train`` with an exact resume, and the checkpoint overrides (``ResumeMixin``).
- ``card.py``: the model card written next to the weights (``ModelCardMixin``).

Each mixin groups ``transformers.Trainer`` overrides and is only meant to be mixed into ``ShiftLossTrainer``.
"""
