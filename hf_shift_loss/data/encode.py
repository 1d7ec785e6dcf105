"""Examples to tokens: tokenize, mask, truncate and count one example at a time.

:class:`Encoder` is the only place that turns a row of a dataset into ``input_ids`` and ``labels``
(aligned, ``-100`` where not trained; the loss shifts). It is a small picklable object, so
``datasets.Dataset.map(encoder, with_indices=True, num_proc=N)`` runs it in worker processes. Every
row it returns carries its own counts (:data:`hf_shift_loss.data.stats.COUNT_COLUMNS`), so what was
cut is counted where it is cut and travels with the data.

Accepted rows (the format is read from the keys; :func:`detect_format` does it for a whole dataset):

=========================  ==============================================  ===========================
format                     row                                             trained (``train_on``
                                                                           ``"completion"``)
=========================  ==============================================  ===========================
``text``                   ``{"text": str}``                               every token + EOS
``prompt_completion``      ``{"prompt": str, "completion": str}``          completion + EOS
conversational p/c         ``{"prompt": [messages], "completion": [...]}`` the completion's turns
``messages``               ``{"messages": [{"role", "content"}, ...]}``    assistant turns + end of turn
``tokenized``              ``{"input_ids": [...], "labels": [...]?}``      labels (all without them)
=========================  ==============================================  ===========================

Any row may carry ``loss_weights``: a float per token aligned with ``input_ids`` (pre-tokenized rows),
or one number for every token of the example (any format: a per-example weight). The encoded row then
has a ``loss_weights`` list aligned with its ``labels``, cut where they are cut; the loss multiplies each
trained token's loss by its weight (docs/extending.md).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hf_shift_loss.constants import IGNORE_INDEX
from hf_shift_loss.data.chat import (
    DEFAULT_END_OF_TURN,
    DEFAULT_TRAIN_ROLES,
    encode_conversations,
    encode_messages,
)
from hf_shift_loss.data.content import row_template_kwargs, text_content
from hf_shift_loss.data.detect import (
    _FORMAT_HELP,
    FORMAT_KEYS,
    FORMATS,
    detect_format,
    is_chat,
    refuse_template_columns,
    renders_on_its_own,
)
from hf_shift_loss.data.special import has_special_tokens, special_token_strings
from hf_shift_loss.data.stats import COUNT_COLUMNS
from hf_shift_loss.data.validate import loss_weight_list, token_id_list
from hf_shift_loss.options import (
    TRAIN_ON,
    TRUNCATION_MODES,
    EndOfTurnMode,
    TrainOn,
    TruncationMode,
    check_choice,
    check_max_length,
)

__all__ = ["FORMATS", "FORMAT_KEYS", "Encoder", "detect_format", "trained_targets"]


def trained_targets(labels: Sequence[int]) -> int:
    """Trained targets after the shift: the first label of a sequence is never a target."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


@dataclass
class Encoder:
    """Turns one example (any format of the module docstring) into ``input_ids``, ``labels`` and counts.

    Args:
        tokenizer: a transformers tokenizer; chat rows need a chat template.
        max_length: longest sequence in tokens, or None. Prompt/completion rows lose prompt tokens from
            the left first (the end of the prompt, next to the answer, is kept), then answer tokens
            from the right; chat rows lose whole oldest exchanges first; text and pre-tokenized rows
            lose their tail. Everything cut is counted.
        train_on: ``"completion"``: the completion, or the turns of ``train_roles`` in a conversation;
            ``"last_turn"``: only the last such turn; ``"all"``: every token.
        train_roles: the roles whose turns are trained (``"assistant"``; add ``"tool"`` or a custom one).
        train_end_of_turn: which end-of-turn tokens are trained, see :func:`encode_messages`.
        add_bos: prepend BOS to non-chat rows; None does what the tokenizer does on plain text.
        add_eos: end completions and texts with a trained EOS, so the model learns to stop.
        chat_template_kwargs: passed to ``apply_chat_template`` (``tools``, ``enable_thinking``, ...).
        truncation_mode: ``"auto"`` cuts as ``max_length`` says above; ``"keep_start"`` /
            ``"keep_end"`` encode the whole row and keep its first / last ``max_length`` tokens, whatever
            the format (TRL's modes; counted the same way).
        split_special_tokens: tokenize the content of text and prompt/completion rows as plain text, so a
            special-token string in it (``"<|im_start|>"``) is not read as the control token (BOS and the
            appended EOS stay special). Chat rows holding one are refused with it: their content and the
            template's control tokens are tokenized together. Rows holding one are counted either way
            (``special_tokens_in_content``, :mod:`.special`).

    ``PromptMaskingCollator``'s docstring runs the article's 13-token example through this encoder.
    """

    tokenizer: Any
    max_length: int | None = None
    train_on: TrainOn = "completion"
    train_roles: tuple[str, ...] = DEFAULT_TRAIN_ROLES
    train_end_of_turn: EndOfTurnMode = DEFAULT_END_OF_TURN
    add_bos: bool | None = None
    add_eos: bool = True
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    truncation_mode: TruncationMode = "auto"
    split_special_tokens: bool = False

    def __post_init__(self) -> None:
        check_max_length(self.max_length)
        check_choice("train_on", self.train_on, TRAIN_ON)
        self.train_roles = (
            (self.train_roles,) if isinstance(self.train_roles, str) else tuple(self.train_roles)
        )
        self.chat_template_kwargs = dict(self.chat_template_kwargs or {})
        if self.add_eos and self.tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no eos_token, so answers cannot end with a trained EOS: set "
                "tokenizer.eos_token (or add_eos=False if the answers carry their own stop token)"
            )
        check_choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        self._bos_token_id = self._resolve_bos()
        # TRL's modes: the whole row is encoded by an uncut twin, then one end is kept (_keep_one_end).
        self._uncut = (
            None
            if self.truncation_mode == "auto" or self.max_length is None
            else replace(self, max_length=None, truncation_mode="auto")
        )

    def _resolve_bos(self) -> int | None:
        bos_token_id = self.tokenizer.bos_token_id
        if self.add_bos is False or bos_token_id is None:
            if self.add_bos:
                raise ValueError(
                    "add_bos=True but the tokenizer has no bos_token; set one or pass add_bos=None"
                )
            return None
        if self.add_bos:
            return bos_token_id
        # Do what the tokenizer does when it encodes text with its special tokens.
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return bos_token_id if probe and probe[0] == bos_token_id else None

    # ------------------------------------------------------------------------------------------ api
    def __call__(self, example: Mapping[str, Any], index: int | None = None) -> dict[str, Any]:
        """Encode one example.

        Args:
            example: a row in one of the accepted formats.
            index: the row's index in its dataset, named in every error message.

        Returns:
            ``{"input_ids": list[int], "labels": list[int], "trained_tokens": int,
            "truncated_tokens": int, "truncated_completion": int, "dropped_turns": int}``, and
            ``"loss_weights": list[float]`` (aligned with ``labels``) when the row has ``loss_weights``.
        """
        if self._uncut is not None:
            return self._keep_one_end(self._uncut(example, index))
        return self._encode_row(example, index)

    def encode_batch(
        self, batch: Mapping[str, Sequence[Any]], indices: Sequence[int] | None = None
    ) -> dict[str, list]:
        """Encode a columnar batch: exactly ``[self(row, index) for each row]``, as columns, faster.

        The function for ``Dataset.map(encoder.encode_batch, batched=True, with_indices=True)``. Chat
        rows are rendered one by one and tokenized together (:func:`encode_conversations`); the strings
        of text and prompt/completion rows are tokenized in one batch call; pre-tokenized rows are
        checked row by row.

        Args:
            batch: ``{column: [value per row]}``, rows in any format of the module docstring.
            indices: the rows' indices in their dataset, named in every error message.

        Returns:
            ``{column: [value per row]}`` with the columns of :meth:`__call__`'s dict.

        Examples:
            >>> from transformers import AutoTokenizer  # doctest: +SKIP
            >>> encoder = Encoder(AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct"))  # doctest: +SKIP
            >>> batch = {"prompt": ["2+2=", "3+3="], "completion": ["4", "6"]}
            >>> encoder.encode_batch(batch, [0, 1])["labels"] == [encoder(  # doctest: +SKIP
            ...     {"prompt": p, "completion": c})["labels"] for p, c in zip(batch["prompt"], batch["completion"])]
            True
        """
        count = len(next(iter(batch.values()))) if batch else 0
        indices = list(indices) if indices is not None else [None] * count
        rows = [{column: values[position] for column, values in batch.items()} for position in range(count)]
        if self._uncut is not None:  # TRL's truncation modes cut whole encoded rows: one by one
            encoded = [self(row, index) for row, index in zip(rows, indices, strict=True)]
            columns = encoded[0] if encoded else dict.fromkeys(("input_ids", "labels", *COUNT_COLUMNS))
            return {column: [row[column] for row in encoded] for column in columns}
        chats: dict[int, tuple[list, int]] = {}
        strings: set[str] = set()
        for position, row in enumerate(rows):
            if not isinstance(row, Mapping) or row.get("input_ids") is not None:
                continue
            if renders_on_its_own(row):
                continue  # per-row tools / template options or structured content: _messages, row by row
            if row.get("messages") is not None:
                chats[position] = (row["messages"], 0)
            elif row.get("prompt") is not None and row.get("completion") is not None:
                prompt, completion = row["prompt"], row["completion"]
                if isinstance(prompt, list) and isinstance(completion, list):
                    chats[position] = (prompt + completion, len(prompt))
                else:
                    strings.update(text for text in (prompt, completion) if isinstance(text, str))
            elif isinstance(row.get("text"), str):
                strings.add(row["text"])
        encoded_chats = dict(zip(chats, self._conversations(chats, indices), strict=True))
        texts = sorted(strings) if not self.split_special_tokens else []
        tokens = (
            dict(zip(texts, self.tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True))
            if texts
            else {}
        )
        encoded = [
            self._encode_row(row, index, encoded_chats.get(position), tokens)
            for position, (row, index) in enumerate(zip(rows, indices, strict=True))
        ]
        columns = encoded[0] if encoded else dict.fromkeys(("input_ids", "labels", *COUNT_COLUMNS))
        return {column: [row[column] for row in encoded] for column in columns}

    def _conversations(self, chats: Mapping[int, tuple[list, int]], indices: list[int | None]) -> list[dict]:
        if not chats:
            return []
        return encode_conversations(
            self.tokenizer,
            [messages for messages, _ in chats.values()],
            example_indices=[indices[position] for position in chats],
            context_messages=[context for _, context in chats.values()],
            **self._chat_options(),
        )

    def _encode_row(
        self,
        example: Mapping[str, Any],
        index: int | None,
        chat: dict[str, Any] | None = None,
        tokens: Mapping[str, list[int]] | None = None,
    ) -> dict[str, Any]:
        """One row; ``chat`` is its conversation already encoded, ``tokens`` its strings already tokenized."""
        where = f"row {index}" if index is not None else "row"
        if not isinstance(example, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(example).__name__}")
        tokens = tokens or {}
        if example.get("input_ids") is not None:
            encoded = self._tokenized(example, where)
        elif example.get("messages") is not None:
            encoded = chat or self._messages(example, example["messages"], index, context_messages=0)
        elif example.get("prompt") is not None and example.get("completion") is not None:
            prompt, completion = example["prompt"], example["completion"]
            if isinstance(prompt, list) and isinstance(completion, list):
                encoded = chat or self._messages(
                    example, prompt + completion, index, context_messages=len(prompt)
                )
            else:
                refuse_template_columns(example, where)
                encoded = self._prompt_completion(prompt, completion, where, tokens)
        elif example.get("text") is not None:
            refuse_template_columns(example, where)
            encoded = self._text(example["text"], where, tokens)
        else:
            present = {key: type(value).__name__ for key, value in example.items()}
            raise ValueError(f"{where}: fits no format (keys and types: {present}); expected {_FORMAT_HELP}")
        encoded.setdefault("blank_completion", 0)
        encoded["special_tokens_in_content"] = int(
            bool(example.get("special_tokens_in_content"))
            or has_special_tokens(example, special_token_strings(self.tokenizer))
        )
        if self.split_special_tokens and encoded["special_tokens_in_content"] and is_chat(example):
            raise ValueError(
                f"{where}: a message's content holds a special-token string, and split_special_tokens=True "
                "cannot keep it as text in a chat row (its content and the template's control tokens are "
                "tokenized together): remove or escape it in the data, or pre-tokenize the row"
            )
        if self.train_on == "all":
            encoded["labels"] = list(encoded["input_ids"])
        encoded["trained_tokens"] = trained_targets(encoded["labels"])
        if "loss_weights" in example:
            encoded["loss_weights"] = _loss_weights(example, encoded, where)
        return encoded

    def _keep_one_end(self, encoded: dict[str, Any]) -> dict[str, Any]:
        """``truncation_mode`` ``"keep_start"``/``"keep_end"``: the first / last ``max_length`` tokens of a
        whole encoded row; the cut tokens, and whether trained ones went, are added to its counts."""
        ids, labels = encoded["input_ids"], encoded["labels"]
        cut = len(ids) - self.max_length
        if cut <= 0:
            return encoded
        kept = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(cut, None)
        lost = labels[self.max_length :] if self.truncation_mode == "keep_start" else labels[:cut]
        encoded["input_ids"], encoded["labels"] = ids[kept], labels[kept]
        encoded["truncated_tokens"] += cut
        encoded["truncated_completion"] = int(
            encoded["truncated_completion"] or any(label != IGNORE_INDEX for label in lost)
        )
        encoded["trained_tokens"] = trained_targets(encoded["labels"])
        return encoded

    # ------------------------------------------------------------------------------------ formats
    def _cut(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int], int, int]:
        """Keep the first ``max_length`` tokens; return the cut count and whether trained tokens went."""
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, labels, 0, 0
        cut_labels = labels[self.max_length :]
        answer_cut = int(any(label != IGNORE_INDEX for label in cut_labels))
        return ids[: self.max_length], labels[: self.max_length], len(cut_labels), answer_cut

    def _encoded(self, ids: list[int], labels: list[int], truncated: int, answer_cut: int) -> dict[str, Any]:
        return {
            "input_ids": ids,
            "labels": labels,
            "truncated_tokens": truncated,
            "truncated_completion": answer_cut,
            "dropped_turns": 0,
            "blank_completion": 0,
        }

    def _text(self, text: Any, where: str, tokens: Mapping[str, list[int]]) -> dict[str, Any]:
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        ids = self._prefix() + self._tokens(text, tokens) + self._eos(text)
        return self._encoded(*self._cut(ids, list(ids)))

    def _prompt_completion(
        self, prompt: Any, completion: Any, where: str, tokens: Mapping[str, list[int]]
    ) -> dict[str, Any]:
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(
                f"{where}: 'prompt' and 'completion' must be two strings or two lists of messages, got "
                f"{type(prompt).__name__} and {type(completion).__name__}"
            )
        if not completion:
            raise ValueError(f"{where}: empty completion; there is nothing to train")
        prompt_ids = self._tokens(prompt, tokens)
        completion_ids = self._tokens(completion, tokens) + self._eos(completion)
        prefix = self._prefix()
        truncated = answer_cut = 0
        if self.max_length is not None:
            overflow = len(prefix) + len(prompt_ids) + len(completion_ids) - self.max_length
            if overflow > 0:
                # Cut the prompt from the left: its end, next to the answer, matters most.
                prompt_cut = min(overflow, len(prompt_ids))
                prompt_ids = prompt_ids[prompt_cut:]
                truncated = prompt_cut
                if overflow > prompt_cut:
                    # Still too long: the answer loses its tail (and its EOS). Counted and reported.
                    completion_ids = completion_ids[: len(completion_ids) - (overflow - prompt_cut)]
                    truncated, answer_cut = overflow, 1
        ids = prefix + prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * (len(prefix) + len(prompt_ids)) + completion_ids
        encoded = self._encoded(ids, labels, truncated, answer_cut)
        encoded["blank_completion"] = int(not completion.strip())  # counted, and said once per dataset
        return encoded

    def _messages(
        self, example: Mapping[str, Any], messages: Any, index: int | None, context_messages: int
    ) -> dict[str, Any]:
        """A conversation (``messages``, or a conversational prompt + completion) through its chat template.

        Tool calls and any role the template renders are accepted; the row's ``tools`` and
        ``chat_template_kwargs`` columns reach the template (over this encoder's
        ``chat_template_kwargs``), and structured content is read as its text (:mod:`.content`). A
        conversation with nothing to train comes back fully masked (``trained_tokens`` 0), so
        ``on_untrained`` decides; malformed messages raise a ValueError naming the row and the message.
        """
        where = f"row {index}" if index is not None else "row"
        template_kwargs = row_template_kwargs(example, self.chat_template_kwargs, where)
        return encode_messages(
            self.tokenizer,
            text_content(self.tokenizer, messages, template_kwargs, index),
            example_index=index,
            context_messages=context_messages,
            **{**self._chat_options(), "chat_template_kwargs": template_kwargs},
        )

    def _chat_options(self) -> dict[str, Any]:
        """The options of :func:`encode_messages` that come from this encoder's settings."""
        return {
            "train_roles": self.train_roles,
            "train_end_of_turn": self.train_end_of_turn,
            "train_on": self.train_on,
            "max_length": self.max_length,
            "chat_template_kwargs": self.chat_template_kwargs,
        }

    def _tokenized(self, example: Mapping[str, Any], where: str) -> dict[str, Any]:
        ids = token_id_list(example["input_ids"], "input_ids", where)
        labels = example.get("labels")
        labels = list(ids) if labels is None else token_id_list(labels, "labels", where)
        if len(labels) != len(ids):
            raise ValueError(
                f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}; labels must be "
                "aligned with input_ids (the loss shifts them: do not pre-shift)"
            )
        encoded = self._encoded(*self._cut(ids, labels))
        # A row encoded earlier (datasets.map) brings its counts along: they add up, never reset.
        for column in ("truncated_tokens", "truncated_completion", "dropped_turns"):
            encoded[column] += int(example.get(column) or 0)
        encoded["truncated_completion"] = min(encoded["truncated_completion"], 1)
        return encoded

    # ------------------------------------------------------------------------------------ pieces
    def _tokens(self, text: str, tokens: Mapping[str, list[int]] | None = None) -> list[int]:
        """``text``'s ids without special tokens (from ``tokens`` when the batch tokenized it already);
        with ``split_special_tokens``, special-token strings in it are tokenized as text."""
        if tokens and text in tokens:
            return list(tokens[text])
        options = {"split_special_tokens": True} if self.split_special_tokens else {}
        return list(self.tokenizer(text, add_special_tokens=False, **options)["input_ids"])

    def _prefix(self) -> list[int]:
        return [self._bos_token_id] if self._bos_token_id is not None else []

    def _eos(self, text: str) -> list[int]:
        eos = self.tokenizer.eos_token
        return [self.tokenizer.eos_token_id] if self.add_eos and not (eos and text.endswith(eos)) else []


def _loss_weights(example: Mapping[str, Any], encoded: Mapping[str, Any], where: str) -> list[float]:
    """The encoded row's ``loss_weights``: the row's list (pre-tokenized rows: cut like ``input_ids``), or its
    one number for every token; None means all ones. ValueError naming the row and position otherwise."""
    weights = example["loss_weights"]
    length = len(encoded["input_ids"])
    if weights is None:
        return [1.0] * length
    if isinstance(weights, numbers.Real) and not isinstance(weights, bool):
        return loss_weight_list([weights], where) * length
    if example.get("input_ids") is None:
        raise ValueError(
            f"{where}: 'loss_weights' is a {type(weights).__name__}; a row that is not pre-tokenized takes one "
            "number for every token of the example (the tokens are not known before encoding), e.g. "
            "{'prompt': ..., 'completion': ..., 'loss_weights': 2.0}"
        )
    values = loss_weight_list(weights, where)
    given = len(example["input_ids"])
    if len(values) != given:
        raise ValueError(
            f"{where}: 'loss_weights' has {len(values)} entries but 'input_ids' has {given}; give one weight "
            "per token, aligned with input_ids exactly like labels (the loss shifts both)"
        )
    return values[:length]  # cut where input_ids were cut
