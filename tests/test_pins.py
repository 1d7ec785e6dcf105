"""Pinning tests: each checks an upstream behaviour that a comment or a workaround in the package relies on.

When one fails, the pinned library changed: update the code that names this test (drop the workaround,
or adapt the check), then the test.
"""

from __future__ import annotations

import re
import warnings

import torch
from helpers import tiny_llama
from transformers import modeling_flash_attention_utils

from hf_shift_loss.trainer import PEFT_DEPRECATED_ALIAS_WARNING, _apply_peft


def _future_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_peft_still_reads_the_deprecated_gradient_checkpointing_alias():
    """trainer._apply_peft silences this one warning; once peft stops reading the alias (or transformers
    removes it), the filter is dead code: delete it and PEFT_DEPRECATED_ALIAS_WARNING."""
    from peft import LoraConfig, get_peft_model

    def lora():
        return LoraConfig(r=2, target_modules=["q_proj"])

    raw = _future_warnings(lambda: get_peft_model(tiny_llama(), lora()))
    assert [message for message in raw if re.match(PEFT_DEPRECATED_ALIAS_WARNING, message)] != []
    # ... and the trainer's filter catches exactly that warning.
    filtered = _future_warnings(lambda: _apply_peft(tiny_llama(), lora(), gradient_checkpointing=False))
    assert filtered == [message for message in raw if not re.match(PEFT_DEPRECATED_ALIAS_WARNING, message)]


def test_flash_attention_unpacks_packed_position_ids_only_in_a_batch_of_one_row():
    """data/pack.py's check_packing_support refuses flash attention with several packed rows per batch."""
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    is_packed = modeling_flash_attention_utils._is_packed_sequence
    assert bool(is_packed(packed, batch_size=1))
    assert not bool(is_packed(packed.repeat(2, 1), batch_size=2))
    assert not bool(is_packed(torch.arange(8).unsqueeze(0), batch_size=1))  # one sequence: not packed
