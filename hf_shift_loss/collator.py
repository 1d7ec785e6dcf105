"""Examples to batches: tokenize, mask the prompt, pad.

``PromptMaskingCollator`` turns a list of examples into ``input_ids``, ``attention_mask`` and ``labels``
tensors ``[batch, seq]``. Labels follow the project's one convention (docs/concepts.md): aligned with
``input_ids``, ``-100`` where a position is not trained. The collator never shifts; the loss does.

Three example formats are accepted:

- ``{"prompt": str, "completion": str}``: prompt and completion are tokenized separately and joined
  as ids, so the boundary is exact (no "response template not found"); the completion ends with EOS,
  which is trained, so the model learns to stop.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template;
  assistant turns and their end-of-turn token are trained (see ``hf_shift_loss.chat``).
- ``{"input_ids": [...], "labels": [...]}``: pre-tokenized; without ``labels`` every token is trained.

Nothing is lost silently: truncated tokens and examples dropped for having no trained token are
counted in :attr:`PromptMaskingCollator.stats` and reported.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from hf_shift_loss.loss import IGNORE_INDEX
from hf_shift_loss.packing import PackingStats, pack_batch, read_ids_and_labels

logger = logging.getLogger(__name__)

__all__ = ["PromptMaskingCollator", "CollatorStats"]

# Keys that encode() adds next to input_ids/labels; they survive datasets.map(num_proc=...), so the
# counts of a pre-tokenized dataset still reach the collator's stats.
_COUNTER_KEYS = ("truncated_tokens", "dropped_turns")


@dataclass
class CollatorStats:
    """What the collator changed or dropped, cumulated over every example it saw."""

    examples: int = 0
    """Examples encoded or received pre-tokenized."""
    total_tokens: int = 0
    """Tokens of those examples after truncation."""
    trained_tokens: int = 0
    """Trained targets of those examples (labels other than ignore_index, after the shift)."""
    truncated_examples: int = 0
    """Examples that lost tokens to ``max_length``."""
    truncated_tokens: int = 0
    """Tokens removed by ``max_length`` (prompt tokens first, then completion tokens)."""
    truncated_completions: int = 0
    """Examples whose completion itself was cut (their EOS is then not trained)."""
    dropped_turns: int = 0
    """Whole conversation turns removed by ``max_length`` (chat examples)."""
    untrained_examples: int = 0
    """Examples that had no trained token (dropped from their batch, or raised)."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        ratio = self.trained_tokens / self.total_tokens if self.total_tokens else 0.0
        return (
            f"{self.examples} examples, {self.total_tokens} tokens, {self.trained_tokens} trained "
            f"({ratio:.1%}); truncated: {self.truncated_examples} examples / {self.truncated_tokens} tokens "
            f"({self.truncated_completions} completions cut, {self.dropped_turns} turns dropped); "
            f"no trained token: {self.untrained_examples} examples"
        )


class PromptMaskingCollator:
    """Callable ``list[dict] -> dict[str, Tensor]`` that masks everything but the answer.

    Args:
        tokenizer: a transformers tokenizer (fast or slow). Its pad token is used for padding; without
            one, its EOS token is (said once). Padding is on the right.
        max_length: longest sequence in tokens. Prompt/completion examples lose prompt tokens from the
            left first (the end of the prompt, next to the answer, is kept), then completion tokens from
            the right. Chat examples lose whole oldest turns first. Everything cut is counted.
        mask_prompt: ``False`` trains every token (plain language modelling on the concatenation).
        add_bos: prepend the BOS token. ``None`` (default) does what the tokenizer itself does when it
            encodes text with special tokens (Llama adds ``<s>``, Qwen and SmolLM2 add nothing).
        add_eos: append the EOS token to completions (trained, so the model learns to stop).
        pad_to_multiple_of: pad the sequence length up to a multiple of this (tensor cores like 8/64).
        on_untrained: an example with no trained token (for example a prompt so long that truncation
            ate the whole completion) is ``"drop"``-ped from its batch and counted, with a warning that
            gives the running count, or ``"raise"``-s a ValueError naming the example.
        train_roles / train_end_of_turn / last_turn_only / chat_template_kwargs: chat options, see
            :func:`hf_shift_loss.chat.encode_messages`.
        ignore_index: label of untrained positions.
        packing: pack the batch's examples into rows of ``max_length`` tokens (best-fit decreasing) and
            return ``input_ids``/``position_ids``/``labels`` with no ``attention_mask``; each sequence's
            first label is masked. See :mod:`hf_shift_loss.packing` and docs/packing.md.
        packing_overflow: with packing, an example longer than ``max_length`` is ``"truncate"``-d (as
            without packing) or ``"split"`` into ``max_length`` pieces; counted in ``packing_stats``.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        mask_prompt: bool = True,
        add_bos: bool | None = None,
        add_eos: bool = True,
        pad_to_multiple_of: int | None = None,
        on_untrained: Literal["drop", "raise"] = "drop",
        train_roles: Sequence[str] = ("assistant",),
        train_end_of_turn: Literal["turn", "last", "all", "none"] = "turn",
        last_turn_only: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        ignore_index: int = IGNORE_INDEX,
        packing: bool = False,
        packing_overflow: Literal["truncate", "split"] = "truncate",
    ) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one input and one target), got {max_length}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        if on_untrained not in ("drop", "raise"):
            raise ValueError(f"on_untrained must be 'drop' or 'raise', got {on_untrained!r}")
        if add_eos and tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no eos_token, so completions cannot end with a trained EOS: set "
                "tokenizer.eos_token (or pass add_eos=False if the completions carry their own stop token)"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.mask_prompt = mask_prompt
        self.add_eos = add_eos
        self.pad_to_multiple_of = pad_to_multiple_of
        self.on_untrained = on_untrained
        self.train_roles = tuple(train_roles)
        self.train_end_of_turn = train_end_of_turn
        self.last_turn_only = last_turn_only
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.ignore_index = ignore_index
        if packing and max_length is None:
            raise ValueError("packing=True needs max_length: it is the capacity of a packed row")
        if packing_overflow not in ("truncate", "split"):
            raise ValueError(f"packing_overflow must be 'truncate' or 'split', got {packing_overflow!r}")
        self.packing = packing
        self.packing_overflow = packing_overflow
        self.pack_length = max_length
        if packing and packing_overflow == "split":
            # Long examples reach the packer whole; it splits them instead of encode() cutting them.
            self.max_length = None
        self.packing_stats = PackingStats()
        self.stats = CollatorStats()
        self._examples_seen = 0
        self._bos_token_id = self._resolve_bos(tokenizer, add_bos)
        self._pad_token_id = self._resolve_pad(tokenizer)

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _resolve_bos(tokenizer: Any, add_bos: bool | None) -> int | None:
        bos_token_id = tokenizer.bos_token_id
        if add_bos is False:
            return None
        if add_bos is True:
            if bos_token_id is None:
                raise ValueError(
                    "add_bos=True but the tokenizer has no bos_token; set one or pass add_bos=None"
                )
            return bos_token_id
        if bos_token_id is None:
            return None
        # Do what the tokenizer does when it encodes text with its special tokens.
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        return bos_token_id if probe and probe[0] == bos_token_id else None

    @staticmethod
    def _resolve_pad(tokenizer: Any) -> int:
        if tokenizer.pad_token_id is not None:
            return tokenizer.pad_token_id
        logger.warning(
            "The tokenizer has no pad token; padding with its eos token %r (id %d). Padded positions are "
            "masked by attention_mask and labels=-100, so this does not train on padding.",
            tokenizer.eos_token,
            tokenizer.eos_token_id,
        )
        return tokenizer.eos_token_id

    # ------------------------------------------------------------------ encoding
    def encode(self, example: Mapping[str, Any], index: int | None = None) -> dict[str, Any]:
        """Tokenize and mask one example; usable with ``datasets.Dataset.map(num_proc=...)``.

        Args:
            example: one of the three formats in the module docstring.
            index: the example's position in its dataset, used in error messages.

        Returns:
            ``{"input_ids": list[int], "labels": list[int], "truncated_tokens": int,
            "dropped_turns": int}``; labels aligned with input_ids, ``ignore_index`` where not trained.
        """
        where = f"example {index}" if index is not None else "example"
        if not isinstance(example, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(example).__name__}")
        if "input_ids" in example and example["input_ids"] is not None:
            # Already tokenized (for example by datasets.map(collator.encode)): keep its labels.
            encoded = self._encode_pretokenized(example, where)
        elif "messages" in example and example["messages"] is not None:
            encoded = self._encode_messages(example["messages"], index)
        elif "prompt" in example and "completion" in example:
            encoded = self._encode_prompt_completion(example["prompt"], example["completion"], where)
        else:
            raise ValueError(
                f"{where}: unknown format with keys {sorted(example)}; expected 'prompt' and 'completion', "
                "'messages', or 'input_ids' (with optional 'labels')"
            )
        if not self.mask_prompt:
            encoded["labels"] = list(encoded["input_ids"])
        return encoded

    def _encode_prompt_completion(self, prompt: Any, completion: Any, where: str) -> dict[str, Any]:
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(
                f"{where}: 'prompt' and 'completion' must be strings, got {type(prompt).__name__} and "
                f"{type(completion).__name__}"
            )
        if not completion:
            raise ValueError(f"{where}: empty completion; there is nothing to train")
        tokenizer = self.tokenizer
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        if self.add_eos and (not completion_ids or completion_ids[-1] != tokenizer.eos_token_id):
            completion_ids.append(tokenizer.eos_token_id)
        prefix = [self._bos_token_id] if self._bos_token_id is not None else []

        truncated_tokens = 0
        truncated_completion = 0
        if self.max_length is not None:
            overflow = len(prefix) + len(prompt_ids) + len(completion_ids) - self.max_length
            if overflow > 0:
                # Cut the prompt from the left: its end, next to the answer, matters most.
                cut_prompt = min(overflow, len(prompt_ids))
                prompt_ids = prompt_ids[cut_prompt:]
                overflow -= cut_prompt
                truncated_tokens += cut_prompt
                if overflow > 0:
                    # Still too long: the completion loses its tail (and its EOS). Counted and reported.
                    completion_ids = completion_ids[: len(completion_ids) - overflow]
                    truncated_tokens += overflow
                    truncated_completion = 1
        input_ids = prefix + prompt_ids + completion_ids
        labels = [self.ignore_index] * (len(prefix) + len(prompt_ids)) + completion_ids
        return {
            "input_ids": input_ids,
            "labels": labels,
            "truncated_tokens": truncated_tokens,
            "truncated_completion": truncated_completion,
            "dropped_turns": 0,
        }

    def _encode_messages(self, messages: Any, index: int | None) -> dict[str, Any]:
        from hf_shift_loss.chat import encode_messages

        encoded = encode_messages(
            self.tokenizer,
            messages,
            train_roles=self.train_roles,
            train_end_of_turn=self.train_end_of_turn,
            last_turn_only=self.last_turn_only,
            max_length=self.max_length,
            chat_template_kwargs=self.chat_template_kwargs,
            example_index=index,
        )
        encoded.setdefault("truncated_completion", 0)
        return encoded

    def _encode_pretokenized(self, example: Mapping[str, Any], where: str) -> dict[str, Any]:
        input_ids, labels = read_ids_and_labels(example, where)
        truncated_tokens = int(example.get("truncated_tokens", 0) or 0)
        truncated_completion = int(example.get("truncated_completion", 0) or 0)
        if self.max_length is not None and len(input_ids) > self.max_length:
            cut = len(input_ids) - self.max_length
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            truncated_tokens += cut
            truncated_completion = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "truncated_tokens": truncated_tokens,
            "truncated_completion": truncated_completion,
            "dropped_turns": int(example.get("dropped_turns", 0) or 0),
        }

    # ------------------------------------------------------------------ batching
    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Encode (if needed), drop untrainable examples (counted), and pad to ``[batch, seq]``."""
        if len(examples) == 0:
            raise ValueError("the collator received an empty list of examples")
        encoded_batch = []
        for example in examples:
            index = self._examples_seen
            self._examples_seen += 1
            encoded = self.encode(example, index)
            trained = _trained_targets(encoded["labels"], self.ignore_index)
            self._count(encoded, trained)
            if trained == 0:
                self.stats.untrained_examples += 1
                if self.on_untrained == "raise":
                    raise ValueError(
                        f"example {index} (counting every example this collator received) has no trained "
                        f"token after masking and truncation ({len(encoded['input_ids'])} tokens, "
                        f"{encoded['truncated_tokens']} truncated); raise max_length, shorten the prompt, "
                        "or pass on_untrained='drop'. For dataset indices, pre-tokenize with "
                        "dataset.map(collator.encode, with_indices=True)."
                    )
                warnings.warn(
                    f"dropped example {index} (counting every example this collator received): no trained "
                    f"token after masking and truncation ({self.stats.untrained_examples} dropped so far)",
                    stacklevel=2,
                )
                continue
            encoded_batch.append(encoded)
        if not encoded_batch:
            # Every example was untrainable. An all-masked batch contributes exactly 0 to the loss (the
            # loss is normalized by the step's trained tokens), which keeps data-parallel ranks in step.
            encoded_batch = [self.encode(examples[0], None)]
        if self.packing:
            return pack_batch(
                encoded_batch,
                self.pack_length,
                self._pad_token_id,
                overflow=self.packing_overflow,
                ignore_index=self.ignore_index,
                pad_to_multiple_of=self.pad_to_multiple_of,
                stats=self.packing_stats,
            )
        return self.pad(encoded_batch)

    def pad(self, encoded_batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad encoded examples: ``input_ids``/``attention_mask``/``labels`` ``[batch, seq]``."""
        longest = max(len(encoded["input_ids"]) for encoded in encoded_batch)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(encoded_batch)
        input_ids = torch.full((batch_size, longest), self._pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        labels = torch.full((batch_size, longest), self.ignore_index, dtype=torch.long)
        for row, encoded in enumerate(encoded_batch):
            length = len(encoded["input_ids"])
            input_ids[row, :length] = torch.as_tensor(encoded["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
            labels[row, :length] = torch.as_tensor(encoded["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _count(self, encoded: Mapping[str, Any], trained: int) -> None:
        stats = self.stats
        stats.examples += 1
        stats.total_tokens += len(encoded["input_ids"])
        stats.trained_tokens += trained
        truncated = int(encoded.get("truncated_tokens", 0))
        stats.truncated_tokens += truncated
        stats.truncated_examples += int(truncated > 0 or int(encoded.get("dropped_turns", 0)) > 0)
        stats.truncated_completions += int(encoded.get("truncated_completion", 0))
        stats.dropped_turns += int(encoded.get("dropped_turns", 0))


def _trained_targets(labels: Sequence[int], ignore_index: int) -> int:
    """Trained targets after the shift: the first label of a sequence is never a target."""
    return sum(1 for label in labels[1:] if label != ignore_index)
