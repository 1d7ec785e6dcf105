"""The mask inspector: terminal view, statistics, HTML report, and the ``hf-shift-loss inspect`` CLI."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pyarrow
import pyarrow.parquet
import pytest
from chat_tokenizers import smollm2_gguf_path, smollm2_tokenizer
from rich.console import Console

from hf_shift_loss.cli import main
from hf_shift_loss.data.chat import encode_messages
from hf_shift_loss.data.stats import DataStats
from hf_shift_loss.inspector import (
    MASKED_STYLES,
    TRAINED_STYLES,
    _clean,
    inspect_dataset,
    render_text,
    token_pieces,
)

CHAT = {
    "messages": [
        {"role": "user", "content": "What is the capital of China? 你好 😀"},
        {"role": "assistant", "content": "Beijing.\n北京 🏯"},
        {"role": "user", "content": "And of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}
LONG_CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "old question " * 20},
        {"role": "assistant", "content": "old answer " * 20},
        {"role": "user", "content": "new question"},
        {"role": "assistant", "content": "new answer"},
    ]
}
PROMPT_COMPLETION = {"prompt": "Q: 2+2=", "completion": " 4"}
PRETOKENIZED = {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}
NOTHING_TO_TRAIN = {"messages": [{"role": "user", "content": "only a question"}]}
NAMED_CHAT = {
    "messages": [
        {"role": "user", "content": "Capital of France?", "name": "alice"},
        {"role": "assistant", "content": "Paris."},
    ]
}
# Renders a message's name only where the key exists, and refuses system messages.
NAME_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] }}{% if message.name is defined %}{{ ' (' + message.name + ')' }}"
    "{% endif %}{{ '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
)


def write_jsonl(path, examples) -> str:
    path.write_text(
        "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples), encoding="utf-8"
    )
    return str(path)


class ReportParser(HTMLParser):
    """Collects the statistics table, the images and, per example, trained and all token texts."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, str] = {}
        self.images: list[str] = []
        self.examples: dict[int, dict[str, str]] = {}
        self._stat: str | None = None
        self._example: int | None = None
        self._token_classes: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and "data-name" in attrs:
            self._stat = attrs["data-name"]
            self.stats[self._stat] = ""
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "div" and attrs.get("class") == "example":
            self._example = int(attrs["data-index"])
            self.examples[self._example] = {"text": "", "trained": ""}
        elif tag == "span" and self._example is not None:
            self._token_classes.append(attrs.get("class", ""))

    def handle_endtag(self, tag):
        if tag == "td":
            self._stat = None
        elif tag == "div":
            self._example = None
        elif tag == "span" and self._token_classes:
            self._token_classes.pop()

    def handle_data(self, data):
        if self._stat is not None:
            self.stats[self._stat] += data
        if self._example is not None:
            self.examples[self._example]["text"] += data
            if any(css_class.startswith("t") for css_class in self._token_classes):
                self.examples[self._example]["trained"] += data


def test_cli_inspect_writes_statistics_and_html_report(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [CHAT, PROMPT_COMPLETION, PRETOKENIZED, NOTHING_TO_TRAIN])
    html_path, stats_path = tmp_path / "report.html", tmp_path / "stats.json"
    argv = ["inspect", "--tokenizer", smollm2_gguf_path(), "--data", data, "-n", "3"]
    assert main([*argv, "--html", str(html_path), "--stats-json", str(stats_path)]) == 0

    stats = json.loads(stats_path.read_text())
    tokenizer = smollm2_tokenizer()
    chat = encode_messages(tokenizer, CHAT["messages"])
    chat_trained = sum(label != -100 for label in chat["labels"][1:])
    completion_tokens = len(tokenizer(" 4", add_special_tokens=False)["input_ids"]) + 1  # + trained EOS
    # A conversation with no assistant turn is untrainable: counted as dropped, as training drops it.
    assert stats["examples"] == 4 and stats["failed_examples"] == 0 and stats["kept_examples"] == 3
    assert stats["formats"] == {"messages": 2, "prompt_completion": 1, "tokenized": 1}
    assert stats["trained_tokens"] == chat_trained + completion_tokens + 2
    prompt_tokens = len(tokenizer("Q: 2+2=", add_special_tokens=False)["input_ids"])
    assert stats["total_tokens"] == len(chat["input_ids"]) + prompt_tokens + completion_tokens + 4
    assert stats["trained_ratio"] == pytest.approx(stats["trained_tokens"] / stats["total_tokens"])
    assert stats["truncated_examples"] == 0 and stats["untrained_examples"] == 1
    assert stats["errors"] == []
    assert sum(stats["length_histogram"]["counts"]) == 3

    report = ReportParser()
    report.feed(html_path.read_text(encoding="utf-8"))
    assert report.stats["examples"] == "4" and "examples that failed to encode" not in report.stats
    assert report.stats["examples with no trained token"] == "1"
    assert report.stats["trained tokens"].startswith(f"{stats['trained_tokens']} (")
    assert report.images and report.images[0].startswith("data:image/png;base64,")
    assert base64.b64decode(report.images[0].split(",", 1)[1]).startswith(b"\x89PNG")
    assert report.examples[0]["trained"] == "Beijing.⏎\n北京 🏯<|im_end|>Paris.<|im_end|>"
    assert report.examples[0]["text"].replace("⏎", "") == tokenizer.decode(chat["input_ids"])
    assert report.examples[1]["trained"] == " 4<|im_end|>"

    out = capsys.readouterr().out  # not a terminal: plain view, trained runs in ⟦ ⟧, tokens split by |
    assert "⟦Paris|.|<|im_end|>⟧" in out
    assert "examples with no trained token" in out and "HTML report" in out


def test_cli_inspect_counts_truncation_and_dropped_turns(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [LONG_CHAT, PROMPT_COMPLETION])
    stats_path = tmp_path / "stats.json"
    argv = ["inspect", "--tokenizer", smollm2_gguf_path(), "--data", data, "--max-length", "40", "--no-html"]
    assert main([*argv, "--stats-json", str(stats_path), "--train-on", "last_turn"]) == 0
    stats = json.loads(stats_path.read_text())
    expected = encode_messages(smollm2_tokenizer(), LONG_CHAT["messages"], max_length=40, last_turn_only=True)
    assert expected["dropped_turns"] == 2
    assert stats["dropped_turns"] == 2 and stats["truncated_examples"] == 1
    assert stats["truncated_tokens"] == expected["truncated_tokens"]
    assert stats["max_length"] == 40 and stats["max_length_seen"] <= 40
    assert not (tmp_path / "inspect-report.html").exists()


def test_rich_view_colours_trained_tokens_green_and_masked_dim():
    tokenizer = smollm2_tokenizer()
    encoded = encode_messages(tokenizer, CHAT["messages"])
    text = render_text(tokenizer, encoded["input_ids"], encoded["labels"])
    styles_by_text: dict[str, set[str]] = {}
    for span in text.spans:
        styles_by_text.setdefault(text.plain[span.start : span.end], set()).add(str(span.style))
    assert styles_by_text["Paris"] <= set(TRAINED_STYLES)
    assert styles_by_text["<|im_start|>"] <= set(MASKED_STYLES)
    assert "⏎\n" in text.plain


def test_token_pieces_keep_multibyte_characters_whole():
    tokenizer = smollm2_tokenizer()
    text = "北京 🏯 café\nnaïve"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    assert "".join(piece for _, _, piece in pieces) == text
    assert all("\ufffd" not in piece for _, _, piece in pieces)
    assert [start for start, _, _ in pieces] == sorted({start for start, _, _ in pieces})
    assert len(pieces) < len(ids)  # byte-level BPE splits 北 and 🏯 into several tokens


def test_inspect_dataset_python_api_with_recording_console(tmp_path):
    console = Console(record=True, width=100, color_system="truecolor")
    report = inspect_dataset(
        smollm2_tokenizer(), [CHAT, PROMPT_COMPLETION], num_examples=1, console=console, show_progress=True
    )
    assert isinstance(report.stats, DataStats)
    assert report.stats.examples == 2 and report.failed_examples == 0
    assert report.to_dict()["formats"] == {"messages": 1, "prompt_completion": 1}
    assert report.to_dict()["trained_tokens"] == report.stats.trained_tokens
    svg = console.export_svg(title="hf-shift-loss inspect")
    assert "Paris" in svg and "#7ee787" in svg  # the trained green


def test_inspect_dataset_train_on_all_trains_every_target():
    console = Console(record=True, width=100, color_system=None)
    report = inspect_dataset(
        smollm2_tokenizer(), [CHAT, PROMPT_COMPLETION, PRETOKENIZED], console=console, train_on="all"
    )
    assert report.stats.trained_tokens == report.stats.total_tokens - 3  # all but each first token
    assert report.trained_ratio == pytest.approx(report.stats.trained_tokens / report.stats.total_tokens)


def test_none_valued_message_keys_are_removed_before_encoding():
    row = {
        "prompt": [{"role": "user", "content": "2+2=", "name": None}],
        "completion": [{"role": "assistant", "content": "4", "tool_calls": None}],
        "messages": None,
    }
    assert _clean(row) == {
        "prompt": [{"role": "user", "content": "2+2="}],
        "completion": [{"role": "assistant", "content": "4"}],
        "messages": None,
    }
    assert _clean(PROMPT_COMPLETION) is PROMPT_COMPLETION


def test_cli_inspect_chat_template_none_keys_and_template_errors(tmp_path, capsys):
    # Parquet gives every message a "name" (None where absent); the inspector strips it before encoding
    # (recent transformers also drop None keys in apply_chat_template: this guards both layers).
    data = str(tmp_path / "data.parquet")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([NAMED_CHAT, LONG_CHAT, CHAT]), data)
    template = tmp_path / "template.jinja"
    template.write_text(NAME_TEMPLATE, encoding="utf-8")
    html_path, stats_path = tmp_path / "report.html", tmp_path / "stats.json"
    argv = ["inspect", "--tokenizer", smollm2_gguf_path(), "--data", data, "--chat-template", str(template)]
    assert main([*argv, "--html", str(html_path), "--stats-json", str(stats_path), "--no-progress"]) == 0

    stats = json.loads(stats_path.read_text())
    assert stats["examples"] == 2 and stats["failed_examples"] == 1
    assert "row 1" in stats["errors"][0] and "no system messages" in stats["errors"][0]
    report = ReportParser()
    report.feed(html_path.read_text(encoding="utf-8"))
    named = report.examples[0]["text"].replace("⏎", "")
    assert named.startswith("<|im_start|>user (alice)\nCapital of France?<|im_end|>")
    assert "None" not in named and "None" not in report.examples[2]["text"]
    assert report.examples[0]["trained"] == "Paris.<|im_end|>"

    # Every example failing: exit status 1, for CI data checks.
    failing = write_jsonl(tmp_path / "failing.jsonl", [LONG_CHAT])
    argv = [
        "inspect",
        "--tokenizer",
        smollm2_gguf_path(),
        "--data",
        failing,
        "--chat-template",
        str(template),
    ]
    assert main([*argv, "--no-html"]) == 1
