"""Where data and tokenizers come from: one loader each, for the trainer, the recipe and the inspector.

Both are thin, real loading code over ``datasets`` and ``transformers``: a local file or directory, or a
hub id (nothing here forces the network; tests use local files only).
"""

from __future__ import annotations

import os
from typing import Any

import datasets

__all__ = ["load_data", "load_tokenizer", "set_tokenizer_options"]

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


def load_tokenizer(
    source: str,
    *,
    gguf_file: str | None = None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """A tokenizer from a directory or hub id, or from a GGUF checkpoint (a ``.gguf`` path, or ``gguf_file``).

    Args:
        source: a directory or hub id (``AutoTokenizer.from_pretrained``), or a path to a ``.gguf`` file.
        gguf_file: the GGUF file's name inside ``source``.
        chat_template: a Jinja chat template, or a path to a file holding one, replacing the tokenizer's.
        trust_remote_code: run the tokenizer code the checkpoint ships (``from_pretrained``'s).
    """
    from transformers import AutoTokenizer

    if gguf_file is None and source.endswith(".gguf") and os.path.isfile(source):
        source, gguf_file = os.path.split(os.path.abspath(source))
    options = {"gguf_file": gguf_file} if gguf_file else {}
    if trust_remote_code:
        options["trust_remote_code"] = True
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    if chat_template is not None:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as file:
                chat_template = file.read()
        tokenizer.chat_template = chat_template
    return tokenizer


def set_tokenizer_options(
    tokenizer: Any, *, eos_token: str | None = None, chat_template_path: str | None = None
) -> None:
    """TRL's ``eos_token`` and ``chat_template_path`` on ``tokenizer``, in place (the model's side of
    ``eos_token`` is the trainer's).

    Args:
        tokenizer: a transformers tokenizer.
        eos_token: a token of its vocabulary that becomes its ``eos_token`` (texts and completions end
            with it); ValueError if it is not in the vocabulary.
        chat_template_path: a ``.jinja``/``.j2`` file whose template replaces the tokenizer's. TRL also
            accepts a tokenizer to clone the template from (adding its tokens and resizing the model):
            refused here with what to do instead.

    Examples:
        >>> class Tok:  # a stand-in with a vocabulary
        ...     eos_token = "</s>"
        ...     def get_vocab(self): return {"</s>": 0, "<|im_end|>": 1}
        >>> tokenizer = Tok()
        >>> set_tokenizer_options(tokenizer, eos_token="<|im_end|>")
        >>> tokenizer.eos_token
        '<|im_end|>'
    """
    if eos_token is not None:
        if eos_token not in tokenizer.get_vocab():
            raise ValueError(
                f"eos_token={eos_token!r} is not in the tokenizer's vocabulary; add it (tokenizer.add_special_tokens "
                "and model.resize_token_embeddings) or name a token it has"
            )
        tokenizer.eos_token = eos_token
    if chat_template_path is not None:
        if not (os.path.isfile(chat_template_path) and chat_template_path.endswith((".jinja", ".j2"))):
            raise ValueError(
                f"chat_template_path={chat_template_path!r} is not a .jinja/.j2 file; cloning the template of "
                "another tokenizer (TRL's other reading of it) also adds its special tokens and resizes the model: "
                "do that first (trl.clone_chat_template) and pass the tokenizer as processing_class"
            )
        with open(chat_template_path, encoding="utf-8") as file:
            tokenizer.chat_template = file.read()
