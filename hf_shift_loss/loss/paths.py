"""The one way to run the loss on a model: a loss path, chosen once per model.

- :class:`EagerLoss`: the model computes logits ``[batch, seq, vocab]``, then
  :func:`hf_shift_loss.causal_lm_loss`.
- :class:`FusedLoss`: owns the model's head (:class:`~hf_shift_loss.loss.heads.OutputHead`: weight, bias,
  logit scale, soft-cap); the model runs with its ``lm_head`` as the identity, so it returns hidden
  states ``[batch, seq, hidden]``, and :func:`hf_shift_loss.fused_linear_cross_entropy` applies the head
  in chunks of trained tokens: the full logits never exist.

:func:`choose_loss_path` is the one place that decides, and says why when it falls back to eager.
Both paths have the same call: ``path(model, model_inputs, labels, shift=True, reduction="mean",
num_items_in_batch=None, count_correct=False, loss_weights=None, token_loss=None) -> LossResult``,
``model_inputs`` being the batch without its labels. The trainer, the tests and docs/fused-loss.md all
run the loss this way.

Both paths hand on the model's outputs with ``last_hidden_state``: the hidden states ``[batch, seq,
hidden]`` the lm_head takes (for auxiliary losses and probes). The fused path's outputs have no logits:
reading ``outputs.logits`` there raises :class:`LogitsNotComputedError`, which says what to use instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from hf_shift_loss.loss.eager import (
    TokenLoss,
    apply_token_loss,
    causal_lm_loss,
)
from hf_shift_loss.loss.engines import unsharded, zero3_refusal
from hf_shift_loss.loss.fused import fused_linear_cross_entropy
from hf_shift_loss.loss.heads import (
    OutputHead,
    UnsupportedOutputHead,
    call_as_lm_head,
    get_output_head,
    lm_head_returns_hidden_states,
    record_lm_head_input,
)
from hf_shift_loss.loss.predictions import count_correct_tokens, sum_token_entropy
from hf_shift_loss.options import LOSS_IMPLS, LossImpl, LossType, Reduction, check_choice

__all__ = ["EagerLoss", "FusedLoss", "LogitsNotComputedError", "LossResult", "choose_loss_path"]

NO_LOGITS_MESSAGE = (
    "the fused loss path made no logits: it applies the lm_head chunk by chunk inside the loss, so the "
    "[batch, seq, vocab] logits never exist. Read outputs.last_hidden_state instead (the hidden states "
    "[batch, seq, hidden] the lm_head takes: auxiliary losses, probes), or set loss_impl='eager' to get "
    "outputs.logits (docs/extending.md)"
)


class LogitsNotComputedError(AttributeError, KeyError):
    """``outputs.logits`` (or ``outputs["logits"]``) read from the fused path, which computes no logits.

    An ``AttributeError`` (so ``hasattr(outputs, "logits")`` is False) and a ``KeyError``.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else NO_LOGITS_MESSAGE


logger = logging.getLogger(__name__)


class LossResult(NamedTuple):
    loss: torch.Tensor
    """The reduced loss (a float32 scalar)."""
    correct_tokens: torch.Tensor | None
    """Trained tokens whose argmax is the target (when asked), else None."""
    outputs: Any
    """The model's outputs (without logits on the fused path)."""
    router_loss: torch.Tensor | None = None
    """An MoE model's load-balancing loss times its ``router_aux_loss_coef``, as its own forward adds it
    to the loss (None for dense models, or when the model does not output router logits)."""
    entropy_sum: torch.Tensor | None = None
    """Sum over trained tokens of the predicted distribution's entropy (when asked), else None."""


class _LossPath:
    """What both paths share: one call signature, the model's forward, then the path's own loss."""

    name: str
    router_aux_loss_coef: float

    def __call__(
        self,
        model: nn.Module,
        model_inputs: dict[str, Any],
        labels: torch.Tensor,
        *,
        shift: bool = True,
        reduction: Reduction = "mean",
        num_items_in_batch: torch.Tensor | int | None = None,
        count_correct: bool = False,
        measure_entropy: bool = False,
        loss_weights: torch.Tensor | None = None,
        token_loss: TokenLoss | None = None,
    ) -> LossResult:
        """Run ``model(**model_inputs)`` (wrapped as it is: DDP, FSDP2, peft) and the loss of ``labels``.

        Args:
            model: the model this path was chosen for, or its wrapper.
            model_inputs: the batch as the model's forward takes it, *without* ``labels`` (the model
                must not compute a loss of its own): ``input_ids`` ``[batch, seq]``, ``attention_mask``
                or ``position_ids``, ...
            labels: ``[batch, seq]``, aligned with ``input_ids`` (``shift=True``) or pre-shifted.
            shift, reduction, num_items_in_batch: as :func:`hf_shift_loss.causal_lm_loss`.
            count_correct: also count the trained tokens whose argmax is the target (the logged token
                accuracy).
            measure_entropy: also sum the entropy of the predicted distribution over the trained tokens
                (the logged ``entropy``).
            loss_weights: ``[batch, seq]`` float weight per token, aligned with ``labels``
                (:func:`hf_shift_loss.causal_lm_loss`).
            token_loss: a per-token loss, ``[trained]`` losses to ``[trained]`` values, applied before the
                weights and the reduction (:func:`hf_shift_loss.loss.apply_token_loss`); the path then
                computes per-token losses (``reduction="none"``; the fused path recomputes its logits in
                backward).

        Returns:
            :class:`LossResult`; its ``outputs`` carry the attribute ``last_hidden_state`` ``[batch, seq,
            hidden]`` (the lm_head's input), except from an eager model without ``get_output_embeddings()``.
            An attribute, not a key: the stock ``Trainer.prediction_step`` hands every key but the loss to
            ``compute_metrics`` as predictions, and ``to_tuple()`` keeps its order.
        """
        options = {"shift": shift, "reduction": reduction, "num_items_in_batch": num_items_in_batch}
        if token_loss is None:
            with_weights = options | {"loss_weights": loss_weights}
            result = self._run(model, model_inputs, labels, with_weights, count_correct, measure_entropy)
        else:
            per_token = options | {"reduction": "none", "num_items_in_batch": None, "loss_weights": None}
            result = self._run(model, model_inputs, labels, per_token, count_correct, measure_entropy)
            loss = apply_token_loss(result.loss, labels, token_loss, loss_weights=loss_weights, **options)
            result = result._replace(loss=loss)
        aux_loss = result.outputs.get("aux_loss") if isinstance(result.outputs, dict) else None
        if aux_loss is None or not self.router_aux_loss_coef:
            return result
        return result._replace(router_loss=self.router_aux_loss_coef * aux_loss.to(result.loss.device))

    def _run(
        self,
        model: nn.Module,
        model_inputs: dict,
        labels: torch.Tensor,
        options: dict,
        count_correct: bool,
        measure_entropy: bool,
    ) -> LossResult:
        raise NotImplementedError


@dataclass(frozen=True)
class EagerLoss(_LossPath):
    """Full logits ``[batch, seq, vocab]`` from the model, then :func:`causal_lm_loss`."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    router_aux_loss_coef: float = 0.0
    loss_type: LossType = "nll"
    reason: str = "loss_impl='eager'"
    name: str = "eager"

    def _run(
        self,
        model: nn.Module,
        model_inputs: dict,
        labels: torch.Tensor,
        options: dict,
        count_correct: bool,
        measure_entropy: bool,
    ) -> LossResult:
        with record_lm_head_input(model) as recorded:
            outputs = model(**model_inputs)
        if isinstance(outputs, dict) and recorded.hidden is not None:
            outputs.last_hidden_state = recorded.hidden  # an attribute, not a key (__call__ says why)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = causal_lm_loss(
            logits,
            labels,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            loss_type=self.loss_type,
            **options,
        )
        # The argmax and the entropy are more passes over [batch, seq, vocab]: only when they are logged.
        correct = (
            count_correct_tokens(logits.detach(), labels, shift=options["shift"]) if count_correct else None
        )
        entropy = (
            sum_token_entropy(logits.detach(), labels, shift=options["shift"]) if measure_entropy else None
        )
        return LossResult(loss, correct, outputs, entropy_sum=entropy)


@dataclass(frozen=True)
class FusedLoss(_LossPath):
    """Hidden states from the model (its lm_head made the identity), then the chunked fused loss.

    The path owns the head (:attr:`head`): its weight and bias as the model's forward would use them now
    (peft adapters switched or disabled included), and the logit scale and soft-cap the model applies.
    """

    head: OutputHead
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    router_aux_loss_coef: float = 0.0
    loss_type: LossType = "nll"
    chunk_size: int | None = None
    sync_free: bool = False
    """Fixed shapes, no host sync: what ``torch.compile(fullgraph=True)`` and CUDA graphs need."""
    name: str = "fused"

    def _run(
        self,
        model: nn.Module,
        model_inputs: dict,
        labels: torch.Tensor,
        options: dict,
        count_correct: bool,
        measure_entropy: bool,
    ) -> LossResult:
        # The wrapped model is called, not its backbone, so DDP's hooks, peft and accelerate see the whole
        # forward; only the [batch, seq, vocab] logits are skipped.
        with lm_head_returns_hidden_states(self.head) as recorded:
            outputs = model(**model_inputs)

        def fused_head_and_loss(hidden: torch.Tensor) -> Any:
            weight, bias = unsharded(self.head.weight), unsharded(self.head.bias)
            return fused_linear_cross_entropy(
                hidden.to(weight.device),  # model parallel without accelerate's hook on the head
                weight,
                labels,
                bias=bias,
                logit_scale=self.head.logit_scale,
                logit_softcap=self.head.logit_softcap,
                label_smoothing=self.label_smoothing,
                z_loss=self.z_loss,
                chunk_size=self.chunk_size,
                return_correct=count_correct,  # the argmax per chunk only when the accuracy is logged
                return_entropy=measure_entropy,
                sync_free=self.sync_free,
                loss_type=self.loss_type,
                **options,
            )

        # Inside a call of the lm_head module: DeepSpeed ZeRO-3's hooks gather its weight for this forward
        # and again for the backward (after the model's forward it is a 0-element placeholder), and
        # accelerate's device_map hook moves the hidden states to the head's device (loading an offloaded
        # weight).
        result = call_as_lm_head(self.head, fused_head_and_loss, recorded.hidden)
        extras = list(result[1:]) if count_correct or measure_entropy else []
        loss = result[0] if extras else result
        correct = extras.pop(0) if count_correct else None
        entropy = extras.pop(0) if measure_entropy else None
        if isinstance(outputs, dict):  # its "logits" are hidden states: hand them on without
            kept = {key: value for key, value in outputs.items() if key != "logits"}
            outputs = _without_logits(type(outputs))(**kept)
            outputs.last_hidden_state = recorded.hidden  # an attribute, not a key (__call__ says why)
        return LossResult(loss, correct, outputs, entropy_sum=entropy)


@functools.cache
def _without_logits(output_class: type) -> type:
    """``output_class`` (a transformers ``ModelOutput``) whose ``logits`` raise :class:`LogitsNotComputedError`.

    A subclass made once per output class: the same fields, dict keys and pytree registration, with a
    ``logits`` that can only be None (what the dataclass ``__init__`` writes) and is never read as None:
    ``outputs.logits.float()`` would otherwise fail far from its cause, on ``'NoneType' object``.
    """

    def get_logits(self: Any) -> None:
        raise LogitsNotComputedError(NO_LOGITS_MESSAGE)

    def set_logits(self: Any, value: Any) -> None:
        if value is not None:
            raise LogitsNotComputedError(NO_LOGITS_MESSAGE)

    def get_item(self: Any, key: Any) -> Any:
        if key == "logits":
            raise LogitsNotComputedError(NO_LOGITS_MESSAGE)
        return output_class.__getitem__(self, key)

    def representation(self: Any) -> str:  # the dataclass repr would read every field, logits included
        items = ", ".join(f"{key}={value!r}" for key, value in self.items())
        return f"{type(self).__name__}({items})"

    return type(
        output_class.__name__,
        (output_class,),
        {
            "__module__": __name__,
            "__doc__": f"{output_class.__name__} from the fused loss path: no logits (see LogitsNotComputedError).",
            "logits": property(get_logits, set_logits),
            "__getitem__": get_item,
            "__repr__": representation,
            "__eq__": dict.__eq__,
            "__hash__": None,
        },
    )


def choose_loss_path(
    model: nn.Module,
    loss_impl: LossImpl = "auto",
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    fsdp_version: int | None = None,
    zero3: Mapping[str, Any] | None = None,
    sync_free: bool = False,
    loss_type: LossType = "nll",
) -> EagerLoss | FusedLoss:
    """The loss path for ``model`` (unwrapped from DDP/accelerate; peft models as they are).

    ``"eager"`` never fuses. ``"auto"`` and ``"fused"`` fuse when the model splits into a backbone and a
    plain linear head (:func:`hf_shift_loss.heads.get_output_head`); otherwise they fall back to eager,
    with the reason in ``EagerLoss.reason`` and one warning. Under FSDP2 (``fsdp_version=2``) the fused
    loss gathers the sharded lm_head weight itself (:func:`~hf_shift_loss.loss.engines.unsharded`); FSDP1's flat parameters hide
    the weight, so ``fsdp_version=1`` falls back to eager. Under DeepSpeed ZeRO-3 (``zero3``: its
    ``zero_optimization`` section) the fused loss runs inside a call of the lm_head module, whose hooks
    gather the partitioned weight (:func:`hf_shift_loss.loss.heads.call_as_lm_head`); where a ZeRO-3
    feature gathers it only inside another module's forward, it falls back to eager (:func:`~hf_shift_loss.loss.engines.zero3_refusal`).
    ``loss_type`` (``"nll"``, ``"dft"``) is the per-token weighting both paths apply
    (:mod:`hf_shift_loss.loss.weighting`).

    Examples:
        A tiny Llama: the fused path's loss is the model's own (which computes the full logits):

        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from hf_shift_loss.loss import choose_loss_path
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(config)
        >>> input_ids = torch.randint(0, 50, (2, 6))
        >>> labels = input_ids.clone()
        >>> labels[:, :3] = -100  # the prompt
        >>> path = choose_loss_path(model)
        >>> path.name
        'fused'
        >>> loss = path(model, {"input_ids": input_ids}, labels).loss
        >>> bool(torch.allclose(loss, model(input_ids=input_ids, labels=labels).loss))
        True
    """
    check_choice("loss_impl", loss_impl, LOSS_IMPLS)
    # MoE models add coef * load-balancing loss to their loss when they output router logits.
    config = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "config", None)
    coefficient = (
        getattr(config, "router_aux_loss_coef", 0.0)
        if getattr(config, "output_router_logits", False)
        else 0.0
    )
    options = {
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
        "router_aux_loss_coef": float(coefficient or 0.0),
        "loss_type": loss_type,
    }
    if loss_impl == "eager":
        return EagerLoss(**options)
    if fsdp_version == 1:
        reason = "FSDP1 flattens the lm_head weight into its flat parameter (use fsdp_version: 2)"
    else:
        try:
            head = get_output_head(model)
            reason = zero3_refusal(model, head, zero3) if zero3 is not None else None
            if reason is None:
                return FusedLoss(head, chunk_size=chunk_size, sync_free=sync_free, **options)
        except UnsupportedOutputHead as error:
            reason = str(error)
    logger.warning("loss_impl=%r: using the eager loss (full logits) because %s.", loss_impl, reason)
    return EagerLoss(reason=f"loss_impl={loss_impl!r} fell back: {reason}", **options)
