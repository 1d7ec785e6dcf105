"""The data path: rows -> :class:`Encoder` -> :func:`prepare_dataset` (count, pack) -> :class:`Batcher`.

- ``encode.py``: one example to ``input_ids``/``labels`` and its counts (every format, any chat template
  through ``chat.py``); ``detect.py``: which format a row or a dataset is (``detect_format``).
- ``chat.py``: conversations to ids and labels, one or a batch (``encode_messages``,
  ``encode_conversations``), over ``chat_render.py`` (the render and the messages' character spans),
  ``chat_labels.py`` (tokenization with offsets and the labels from the spans) and ``chat_truncate.py``
  (fitting ``max_length``: oldest exchanges dropped, then tokens cut from the right).
- ``prepare.py``: a whole dataset, once (``datasets.map``), with exact :class:`DataStats`.
- ``pack.py``: dataset-level packing written from the Arrow table, over ``pack_plan.py`` (best-fit
  decreasing decided on the lengths alone); ``pack_attention.py``: the attention check.
- ``batch.py``: rows to padded ``[batch, seq]`` tensors.
- ``load.py``: a dataset from a file, a saved directory or the hub; a tokenizer from a path or a GGUF file.
- ``stats.py``: the one statistics type.
"""

from hf_shift_loss.data.batch import Batcher, resolve_pad_token_id
from hf_shift_loss.data.chat import encode_messages
from hf_shift_loss.data.encode import Encoder, detect_format
from hf_shift_loss.data.prepare import PreparedDataset, prepare_dataset
from hf_shift_loss.data.stats import DataStats

__all__ = [
    "Batcher",
    "DataStats",
    "Encoder",
    "PreparedDataset",
    "detect_format",
    "encode_messages",
    "prepare_dataset",
    "resolve_pad_token_id",
]
