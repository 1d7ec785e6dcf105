"""Find a causal LM's output head, so that the loss can be fused with the head.

The fused loss needs the last hidden states ``[batch, seq, hidden]`` and the weight (and bias) of the
linear layer that turns them into logits. ``get_output_head(model)`` finds the head, for plain
transformers models (tied embeddings included) and peft models (LoRA in the backbone, a frozen or a
``modules_to_save`` lm_head), and :func:`lm_head_returns_hidden_states` makes the model's own forward
hand over the hidden states instead of the logits (:class:`hf_shift_loss.loss.paths.FusedLoss` runs both).
It refuses, with a reason, every model where ``lm_head(backbone(...))`` would not be the model's logits:
a LoRA-targeted lm_head (the adapter would be bypassed), a head that is not a plain ``nn.Linear``
(quantized, custom), prompt-learning adapters, multimodal and encoder-decoder models.

Heads whose forward transforms the logits are split too, with the transform read from the config as
the model applies it: soft-capping ``cap * tanh(logits / cap)`` (``final_logit_softcapping``: Gemma 2/3
and others) and a multiplicative scale (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``,
Falcon-H1's ``lm_head_multiplier``, ...). A scale attribute on a model type not in
:data:`LOGIT_SCALES` is refused: the same attribute multiplies in one model and divides in another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "OutputHead",
    "UnsupportedOutputHead",
    "call_as_lm_head",
    "get_output_head",
    "lm_head_returns_hidden_states",
    "record_lm_head_input",
]

# How each model type's forward scales lm_head(hidden): (config attribute, +1 multiply / -1 divide), as
# read in its transformers modeling file. The same attribute means different things in different models.
LOGIT_SCALES: dict[str, tuple[str, int]] = {
    "cohere": ("logit_scale", 1),
    "cohere2": ("logit_scale", 1),
    "cohere2_moe": ("logit_scale", 1),
    "granite": ("logits_scaling", -1),
    "granite_swa": ("logits_scaling", -1),
    "granitemoe": ("logits_scaling", -1),
    "granitemoe_swa": ("logits_scaling", -1),
    "granitemoehybrid": ("logits_scaling", -1),
    "granitemoeshared": ("logits_scaling", -1),
    "minicpm3": ("logits_scaling", -1),  # divides the hidden states before a bias-free lm_head: the same
    "hyperclovax": ("logits_scaling", 1),
    "falcon_h1": ("lm_head_multiplier", 1),
}
# Soft-capping has one formula wherever it appears: cap * tanh(logits / cap).
_LOGIT_SOFTCAP = "final_logit_softcapping"
_SCALE_ATTRIBUTES = ("logit_scale", "logits_scaling", "lm_head_multiplier")


class UnsupportedOutputHead(ValueError):
    """The model's logits are not ``lm_head(backbone(...))`` for a plain linear head; the message says why."""


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's linear head: ``logits = F.linear(hidden, weight, bias)`` on the last hidden states.

    Attributes:
        head_module: the head as it sits in the model: an ``nn.Linear``, or peft's ``ModulesToSaveWrapper``
            around one (the adapter's trained copy is then resolved at each access of :attr:`lm_head`, so
            that switching or disabling adapters is honoured).
    """

    head_module: nn.Module
    logit_scale: float = 1.0
    """The model multiplies ``lm_head(hidden)`` by this (Cohere, Granite's 1 / logits_scaling, ...)."""
    logit_softcap: float | None = None
    """Then soft-caps it: ``cap * tanh(logits / cap)`` (Gemma 2/3), or None."""

    @property
    def lm_head(self) -> nn.Linear:
        """The ``nn.Linear`` that the model's forward would run now."""
        return _active_linear(self.head_module)

    @property
    def weight(self) -> torch.Tensor:
        """``[vocab, hidden]``, the live parameter (tied to the input embeddings when the model ties them)."""
        return self.lm_head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """``[vocab]`` or None."""
        return self.lm_head.bias


def _active_linear(head_module: nn.Module) -> nn.Linear:
    """The module that computes the logits, looking through peft's ``ModulesToSaveWrapper`` as its forward does."""
    if hasattr(head_module, "modules_to_save") and hasattr(head_module, "original_module"):
        adapters = head_module.active_adapters
        if head_module.disable_adapters or not adapters or adapters[0] not in head_module.modules_to_save:
            return head_module.original_module
        return head_module.modules_to_save[adapters[0]]
    return head_module


def _refusal(model: nn.Module) -> str | None:
    """Why the logits of ``model`` are not ``F.linear(backbone hidden states, weight, bias)``; None if they are."""
    model_name = type(model).__name__
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return f"{model_name} uses a prompt-learning adapter ({type(peft_config).__name__}), which adds virtual tokens in the peft model's forward"

    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if get_output_embeddings is None:
        return f"{model_name} has no get_output_embeddings()"
    head_module = get_output_embeddings()
    if head_module is None:
        return f"{model_name}.get_output_embeddings() returned None (no language-model head)"

    # Imported lazily: peft is an optional dependency.
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError:
        BaseTunerLayer = AuxiliaryTrainingWrapper = ModulesToSaveWrapper = ()  # noqa: N806
    if BaseTunerLayer and isinstance(head_module, BaseTunerLayer):
        return (
            f"the lm_head is adapted by peft ({type(head_module).__name__}); the fused loss would bypass the "
            "adapter. Put lm_head in modules_to_save instead of target_modules, or use the eager loss"
        )
    if AuxiliaryTrainingWrapper and isinstance(head_module, AuxiliaryTrainingWrapper):
        if not isinstance(head_module, ModulesToSaveWrapper):
            return f"the lm_head is wrapped by peft's {type(head_module).__name__}, which the fused loss cannot see through"

    linear = _active_linear(head_module)
    if type(linear) is not nn.Linear:
        return (
            f"the lm_head is a {type(linear).__module__}.{type(linear).__name__}, not a plain torch.nn.Linear "
            "(quantized or custom heads compute their logits differently)"
        )

    config = getattr(model, "config", None)
    if config is not None:
        if getattr(config, "is_encoder_decoder", False):
            return f"{model_name} is an encoder-decoder model; its decoder needs the encoder's outputs"
        get_text_config = getattr(config, "get_text_config", None)
        text_config = get_text_config(decoder=True) if get_text_config is not None else config
        if text_config is not config:
            return f"{model_name} is multimodal; its forward merges non-text inputs before the decoder"
    transform = _logit_transform(model)
    if isinstance(transform, str):
        return transform

    backbone = _backbone(model)
    if backbone is None or backbone is model or backbone is head_module:
        return f"{model_name} has no decoder separate from its head (get_decoder() or base_model_prefix)"
    return None


def _logit_transform(model: nn.Module) -> tuple[float, float | None] | str:
    """``(scale, softcap)`` the model's forward applies after its lm_head, or why it cannot be known."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    config = getattr(base, "config", None)
    if config is None:
        return 1.0, None
    model_type = getattr(config, "model_type", None)
    softcap = getattr(config, _LOGIT_SOFTCAP, None)
    scale = 1.0
    if model_type in LOGIT_SCALES:
        attribute, direction = LOGIT_SCALES[model_type]
        value = getattr(config, attribute, None)
        scale = 1.0 if value is None else float(value) ** direction
    else:
        for name in _SCALE_ATTRIBUTES:
            for owner, where in ((config, "config"), (base, "model")):
                value = getattr(owner, name, None)
                if isinstance(value, (int, float)) and value != 1:
                    return (
                        f"{type(base).__name__} scales its logits ({where}.{name}={value}), and how "
                        f"{model_type!r} applies it is not known; add it to hf_shift_loss.loss.heads.LOGIT_SCALES "
                        "or use the eager loss"
                    )
    if softcap is not None and scale != 1.0:
        return f"{type(base).__name__} both scales and soft-caps its logits; the order is not known"
    return scale, None if softcap is None else float(softcap)


def _backbone(model: nn.Module) -> nn.Module | None:
    """The decoder under the head (refused when there is none: the logits would not be a plain head's)."""
    get_decoder = getattr(model, "get_decoder", None)
    if get_decoder is not None:
        return get_decoder()
    prefix = getattr(model, "base_model_prefix", None)
    return getattr(model, prefix, None) if prefix else None


def get_output_head(model: nn.Module) -> OutputHead:
    """The linear head of ``model``, with the scale and soft-cap its forward applies to the logits.

    Raises:
        UnsupportedOutputHead: with the reason, when the model's logits are not ``lm_head(backbone(...))``
            for a plain linear ``lm_head`` (see the module docstring).
    """
    reason = _refusal(model)
    if reason is not None:
        raise UnsupportedOutputHead(reason)
    scale, softcap = _logit_transform(model)
    return OutputHead(model.get_output_embeddings(), logit_scale=scale, logit_softcap=softcap)


class HiddenStates:
    """What the lm_head received in the last forward pass: ``hidden`` ``[batch, seq, hidden]``."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden  # the model may scale or soft-cap it as "logits": nobody reads that


@contextlib.contextmanager
def _forward_replaced(
    module: nn.Module, forward: Callable[..., Any], *, device_hooks: bool = False
) -> Iterator[None]:
    """Inside this block ``module(...)`` runs ``forward`` instead of its own forward.

    ``module.__call__`` still runs the module's hooks around it (DeepSpeed ZeRO-3 gathers the module's
    parameters in them). accelerate's device hook (``device_map``) lives in the instance's forward: it is
    bypassed, or with ``device_hooks`` kept around ``forward`` (it moves the inputs to the module's device
    and loads an offloaded weight first). Whatever was there is restored.
    """
    hooked = device_hooks and hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__
    attribute = "_old_forward" if hooked else "forward"  # an instance attribute shadows the class's forward
    previous_forward = module.__dict__.get(attribute)
    setattr(module, attribute, forward)
    try:
        yield
    finally:
        if previous_forward is None:
            delattr(module, attribute)
        else:
            setattr(module, attribute, previous_forward)


@contextlib.contextmanager
def lm_head_returns_hidden_states(head: OutputHead) -> Iterator[HiddenStates]:
    """Inside this block the model's lm_head records its input and returns it: no logits are computed.

    :class:`hf_shift_loss.loss.paths.FusedLoss` calls the model (wrapped as it is: DDP, FSDP2, peft) without
    labels inside this block, so the whole forward runs as usual, then applies the head in the fused loss.
    The hidden states ``[batch, seq, hidden]`` are taken where the lm_head gets them, before any scale or
    soft-cap the model applies to its logits.
    """
    recorded = HiddenStates()
    with _forward_replaced(head.lm_head, recorded):
        yield recorded


def call_as_lm_head(head: OutputHead, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` run as the forward of a call of the lm_head module itself.

    The module's hooks run around it, as around the model's own call of its head: under DeepSpeed ZeRO-3
    they gather the partitioned weight for the forward and register the backward hooks that gather it
    again when its gradient arrives (outside such a call, ``head.weight`` is a 0-element placeholder);
    with a ``device_map``, accelerate's hook moves ``args`` to the head's device and loads an offloaded
    weight (outside, it is on the ``meta`` device). :class:`hf_shift_loss.loss.paths.FusedLoss` runs the
    fused loss this way.

    Examples:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2))
        >>> head = get_output_head(model)
        >>> call_as_lm_head(head, lambda hidden: hidden @ head.weight.T, torch.ones(3, 8)).shape
        torch.Size([3, 16])
    """
    with _forward_replaced(head.lm_head, function, device_hooks=True):
        return head.lm_head(*args)


@contextlib.contextmanager
def record_lm_head_input(model: nn.Module) -> Iterator[HiddenStates]:
    """Inside this block the model's lm_head records its input (``[batch, seq, hidden]``) and runs as usual.

    The eager path's counterpart of :func:`lm_head_returns_hidden_states`: a forward pre-hook on
    ``get_output_embeddings()`` (looked for through DDP/FSDP ``.module`` wrappers; peft models answer
    it themselves). Nothing is recorded for a model without one (``recorded.hidden`` stays None).
    """
    recorded = HiddenStates()
    head = None
    for _ in range(8):
        get_output_embeddings = getattr(model, "get_output_embeddings", None)
        if get_output_embeddings is not None:
            head = get_output_embeddings()
            break
        model = getattr(model, "module", None)
        if model is None:
            break

    def record(_: nn.Module, args: tuple) -> None:
        recorded(args[0])

    handle = None if head is None else head.register_forward_pre_hook(record)
    try:
        yield recorded
    finally:
        if handle is not None:
            handle.remove()
