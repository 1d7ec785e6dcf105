"""``PromptMaskingCollator``: the encoder and the batcher in one callable, for people who batch themselves.

``ShiftLossTrainer`` prepares datasets once and batches them with :class:`hf_shift_loss.data.Batcher`;
this class is the same two steps per batch, for a DataLoader of your own or for a custom Trainer:
:class:`hf_shift_loss.data.Encoder` (tokenize, mask the prompt, truncate, count) then the batcher (pad).
Labels follow the project's one convention: aligned with ``input_ids``, -100 where not trained; the
loss shifts. Rows with a ``loss_weights`` column (a float per token, or one per example) give batches
with float32 ``loss_weights`` aligned with ``labels``, which :class:`hf_shift_loss.ShiftLossTrainer`
applies (docs/extending.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_shift_loss.data.batch import Batcher, resolve_pad_token_id
from hf_shift_loss.data.chat import DEFAULT_END_OF_TURN, DEFAULT_TRAIN_ROLES
from hf_shift_loss.data.encode import Encoder
from hf_shift_loss.data.stats import DataStats
from hf_shift_loss.options import ON_UNTRAINED, EndOfTurnMode, OnUntrained, TrainOn, check_choice

__all__ = ["PromptMaskingCollator"]

logger = logging.getLogger(__name__)


class PromptMaskingCollator:
    """Callable ``list[dict] -> dict[str, Tensor]`` that masks everything but the answer and pads.

    Args:
        tokenizer: a transformers tokenizer (fast or slow). Pads with its pad token, else its EOS.
        max_length: longest sequence in tokens; see :class:`hf_shift_loss.data.Encoder` for what is cut.
        train_on: ``"completion"`` (default), ``"last_turn"`` or ``"all"``.
        train_roles / train_end_of_turn / chat_template_kwargs: chat options (:class:`Encoder`).
        add_bos / add_eos: as :class:`Encoder`.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        on_untrained: an example with no trained token is ``"drop"``-ped from its batch (counted in
            :attr:`stats`, warned once) or ``"raise"``-s a ValueError naming it.

    Examples:
        The article's 13-token example, with a word-level tokenizer:

        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> words = "<pad> <bos> <eos> <sep> where is the capital of China The Beijing".split()
        >>> backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
        >>> backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        >>> tokenizer = PreTrainedTokenizerFast(
        ...     tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
        >>> collator = PromptMaskingCollator(tokenizer, add_bos=True)
        >>> batch = collator([{"prompt": "where is the capital of China <sep>",
        ...                    "completion": "The capital is Beijing"}])
        >>> batch["input_ids"]
        tensor([[ 1,  4,  5,  6,  7,  8,  9,  3, 10,  7,  5, 11,  2]])
        >>> batch["labels"][0].tolist()  # the prompt is masked; the answer and its <eos> are trained
        [-100, -100, -100, -100, -100, -100, -100, -100, 10, 7, 5, 11, 2]
        >>> collator.stats.trained_tokens  # 13 tokens, 5 trained targets: The capital is Beijing <eos>
        5
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        train_on: TrainOn = "completion",
        train_roles: Sequence[str] = DEFAULT_TRAIN_ROLES,
        train_end_of_turn: EndOfTurnMode = DEFAULT_END_OF_TURN,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        add_bos: bool | None = None,
        add_eos: bool = True,
        pad_to_multiple_of: int | None = None,
        on_untrained: OnUntrained = "drop",
    ) -> None:
        check_choice("on_untrained", on_untrained, ON_UNTRAINED)
        self.encoder = Encoder(
            tokenizer,
            max_length=max_length,
            train_on=train_on,
            train_roles=tuple(train_roles),
            train_end_of_turn=train_end_of_turn,
            add_bos=add_bos,
            add_eos=add_eos,
            chat_template_kwargs=dict(chat_template_kwargs or {}),
        )
        self.batcher = Batcher(resolve_pad_token_id(tokenizer), pad_to_multiple_of)
        self.on_untrained = on_untrained
        self.stats = DataStats()
        """What this collator encoded, cut and dropped, over every batch it made (in this process)."""
        self._warned = False

    def encode(self, example: Mapping[str, Any], index: int | None = None) -> dict[str, Any]:
        """One example to ``input_ids``/``labels`` and counts; usable with ``datasets.Dataset.map``."""
        return self.encoder(example, index)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Encode (pre-tokenized rows pass through), drop untrainable examples (counted), and pad."""
        if len(examples) == 0:
            raise ValueError("the collator received an empty list of examples")
        encoded_batch = []
        for position, example in enumerate(examples):
            encoded = self.encoder(example, None)
            self.stats.add_example(encoded)
            if encoded["trained_tokens"] > 0:
                encoded_batch.append(encoded)
                continue
            where = f"example {position} of this batch ({len(encoded['input_ids'])} tokens)"
            if self.on_untrained == "raise":
                raise ValueError(
                    f"{where} has no trained token after masking and truncation; raise max_length, shorten "
                    "the prompt, or pass on_untrained='drop'"
                )
            if not self._warned:
                logger.warning("%s has no trained token: dropped (counted in collator.stats)", where)
                self._warned = True
        if not encoded_batch:
            # Every example was untrainable. An all-masked batch contributes exactly 0 to the loss (the
            # loss is normalized by the step's trained tokens), which keeps data-parallel ranks in step.
            encoded_batch = [row for row in map(self.encoder, examples) if row["input_ids"]]
            if not encoded_batch:
                raise ValueError(f"all {len(examples)} examples of this batch are empty (no token at all)")
        return self.batcher(encoded_batch)
