"""Where data and tokenizers come from: one loader each, for the trainer, the recipe and the inspector.

Both are thin, real loading code over ``datasets`` and ``transformers``: a local file or directory, or a
hub id (nothing here forces the network; tests use local files only).
"""

from __future__ import annotations

import os
from typing import Any

import datasets

__all__ = ["load_data", "load_tokenizer"]

_FILE_BUILDERS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_data(source: str, *, split: str = "train", limit: int | None = None) -> datasets.Dataset:
    """A dataset from a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a ``save_to_disk`` directory, or a hub id.

    Args:
        source: the path or hub id.
        split: the split to take from a hub dataset or a saved ``DatasetDict``.
        limit: keep only the first ``limit`` rows.

    Examples:
        >>> import json, tempfile
        >>> path = tempfile.mkdtemp() + "/rows.jsonl"
        >>> with open(path, "w") as file:
        ...     _ = file.write(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\\n")
        >>> load_data(path)[0]
        {'prompt': '2+2=', 'completion': '4'}
    """
    extension = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if extension not in _FILE_BUILDERS:
            raise ValueError(
                f"{source}: unknown data file type {extension!r}; use one of {sorted(_FILE_BUILDERS)}"
            )
        dataset = datasets.load_dataset(_FILE_BUILDERS[extension], data_files=source, split="train")
    elif (
        os.path.isdir(source)
        and os.path.exists(os.path.join(source, "dataset_info.json"))
        or (os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_dict.json")))
    ):
        dataset = datasets.load_from_disk(source)
    else:
        dataset = datasets.load_dataset(source, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{source}: no split {split!r}; the splits are {sorted(dataset)}")
        dataset = dataset[split]
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def load_tokenizer(source: str, *, gguf_file: str | None = None, chat_template: str | None = None) -> Any:
    """A tokenizer from a directory or hub id, or from a GGUF checkpoint (a ``.gguf`` path, or ``gguf_file``).

    Args:
        source: a directory or hub id (``AutoTokenizer.from_pretrained``), or a path to a ``.gguf`` file.
        gguf_file: the GGUF file's name inside ``source``.
        chat_template: a Jinja chat template, or a path to a file holding one, replacing the tokenizer's.
    """
    from transformers import AutoTokenizer

    if gguf_file is None and source.endswith(".gguf") and os.path.isfile(source):
        source, gguf_file = os.path.split(os.path.abspath(source))
    tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    if chat_template is not None:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as file:
                chat_template = file.read()
        tokenizer.chat_template = chat_template
    return tokenizer
