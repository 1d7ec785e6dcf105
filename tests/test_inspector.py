"""The mask inspector: terminal view, statistics, HTML report, and the ``hf-shift-loss inspect`` CLI."""

from __future__ import annotations

import base64
import json
import os
from html.parser import HTMLParser

import pyarrow
import pyarrow.parquet
import pytest
from chat_tokenizers import smollm2_gguf_path, smollm2_tokenizer
from datasets import Dataset
from rich.console import Console

from hf_shift_loss.cli import main
from hf_shift_loss.data import Encoder, prepare_dataset
from hf_shift_loss.data.chat import encode_messages
from hf_shift_loss.data.stats import DataStats
from hf_shift_loss.inspector import inspect_dataset, length_bin_edges, token_pieces
from hf_shift_loss.inspector.report import _clean
from hf_shift_loss.inspector.terminal import MASKED_STYLE, TRAINED_STYLES, render_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_YAML = os.path.join(REPO, "recipes", "configs", "default.yaml")

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
        self.about: dict[str, str] = {}
        self.ids: set[str] = set()
        self.index: dict[str, list[str]] = {}
        self.masked_classes: set[str] = set()
        self.images: list[str] = []
        self._about: str | None = None
        self._kind: str | None = None
        self.examples: dict[int, dict[str, str]] = {}
        self._stat: str | None = None
        self._example: int | None = None
        self._token_classes: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "li" and "data-kind" in attrs:
            self._kind = attrs["data-kind"]
            self.index[self._kind] = []
        elif tag == "a" and self._kind is not None:
            self.index[self._kind].append(attrs["href"])
        if tag == "td" and "data-about" in attrs:
            self._about = attrs["data-about"]
            self.about[self._about] = ""
        elif tag == "td" and "data-name" in attrs:
            self._stat = attrs["data-name"]
            self.stats[self._stat] = ""
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "div" and attrs.get("class") == "example":
            self._example = int(attrs["data-index"])
            self.examples[self._example] = {"text": "", "trained": ""}
        elif tag == "span" and self._example is not None:
            self._token_classes.append(attrs.get("class", ""))
            if not attrs.get("class", "").startswith(("t", "nl", "cut")):
                self.masked_classes.add(attrs.get("class", ""))

    def handle_endtag(self, tag):
        if tag == "td":
            self._stat = self._about = None
        elif tag == "li":
            self._kind = None
        elif tag == "div":
            self._example = None
        elif tag == "span" and self._token_classes:
            self._token_classes.pop()

    def handle_data(self, data):
        if self._stat is not None:
            self.stats[self._stat] += data
        if self._about is not None:
            self.about[self._about] += data
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
    # The header names what was inspected and how; masked tokens have one style; the untrainable row is
    # indexed and shown (beyond -n 3) under its anchor.
    assert report.about["data"] == data and report.about["tokenizer"] == smollm2_gguf_path()
    assert report.about["max_length"] == "None" and report.about["train_roles"] == "assistant"
    assert report.masked_classes == {"m"}
    assert report.index == {"untrained": ["#example-3"]} and "example-3" in report.ids
    assert report.examples[3]["trained"] == ""

    out = capsys.readouterr().out  # not a terminal: plain view, trained runs in ⟦ ⟧, tokens split by |
    assert "⟦Paris|.|<|im_end|>⟧" in out
    assert "examples with no trained token" in out and "HTML report" in out


def test_cli_inspect_counts_truncation_and_dropped_turns(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [LONG_CHAT, PROMPT_COMPLETION])
    stats_path = tmp_path / "stats.json"
    argv = ["inspect", "--tokenizer", smollm2_gguf_path(), "--data", data, "--max-length", "40", "--no-html"]
    assert main([*argv, "--stats-json", str(stats_path), "--train-on", "last_turn"]) == 0
    stats = json.loads(stats_path.read_text())
    expected = encode_messages(
        smollm2_tokenizer(), LONG_CHAT["messages"], max_length=40, train_on="last_turn"
    )
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
    # One style for every masked token (only trained tokens alternate, to show their boundaries).
    masked = {str(span.style) for span in text.spans if str(span.style) not in TRAINED_STYLES}
    assert masked == {MASKED_STYLE}
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


def test_html_report_indexes_every_truncated_cut_untrained_and_failed_example(tmp_path):
    long_answer = {"prompt": "Q?", "completion": " answer" * 60}  # the answer itself is cut at 40
    rows = [PROMPT_COMPLETION] * 3 + [LONG_CHAT, NOTHING_TO_TRAIN, long_answer, {"messages": "not a list"}]
    html_path = tmp_path / "report.html"
    console = Console(record=True, width=100, color_system=None)
    report = inspect_dataset(
        smollm2_tokenizer(),
        rows,
        num_examples=1,
        html_path=str(html_path),
        console=console,
        max_length=40,
        about={"data": "rows.jsonl", "tokenizer": "SmolLM2"},
    )
    assert report.notable == {
        "failed": [6],
        "untrained": [4],
        "answer_cut": [5],
        "truncated": [3, 5],
        "split": [],
    }
    parsed = ReportParser()
    parsed.feed(html_path.read_text(encoding="utf-8"))
    assert parsed.about["data"] == "rows.jsonl" and parsed.about["max_length"] == "40"
    assert parsed.index == {
        "failed": ["#error-6"],
        "untrained": ["#example-4"],
        "answer_cut": ["#example-5"],
        "truncated": ["#example-3", "#example-5"],
    }
    # Every link has its target; row 0 is the one example shown without being notable.
    assert {href[1:] for hrefs in parsed.index.values() for href in hrefs} <= parsed.ids
    assert sorted(parsed.examples) == [0, 3, 4, 5]
    assert json.loads(json.dumps(report.to_dict()))["notable_examples"]["truncated"] == [3, 5]
    out = console.export_text()
    assert "truncated: rows 3, 5" in out and "answer cut: rows 5" in out


def test_packing_split_is_counted_and_marked_as_prepare_dataset_does():
    tokenizer = smollm2_tokenizer()
    rows = [{"text": "word " * 50}, PROMPT_COMPLETION, {"prompt": "Q? " * 10, "completion": " yes" * 30}]
    console = Console(record=True, width=100, color_system=None)
    options = {"max_length": 16, "packing": True, "packing_overflow": "split"}
    report = inspect_dataset(tokenizer, rows, num_examples=3, console=console, **options)
    prepared = prepare_dataset(
        Dataset.from_list(rows[:1]),  # one format per dataset
        Encoder(tokenizer, max_length=16),
        packing=True,
        packing_overflow="split",
    )
    assert report.stats.split_examples == 2 and report.notable["split"] == [0, 2]
    alone = inspect_dataset(tokenizer, rows[:1], console=console, **options)
    assert alone.stats.split_examples == prepared.stats.split_examples == 1
    assert alone.stats.lost_boundary_targets == prepared.stats.lost_boundary_targets > 0
    assert alone.stats.trained_tokens == prepared.stats.trained_tokens
    assert "✂" in console.export_text()


def test_length_histogram_bins_follow_the_data():
    assert length_bin_edges(83, 372) == list(range(80, 381, 20))
    assert length_bin_edges(5, 7) == [5, 6, 7, 8]
    assert length_bin_edges(1000, 1000) == [1000, 1001]
    for low, high in [(0, 10), (96, 382), (3, 40_000), (512, 530)]:
        edges = length_bin_edges(low, high)
        width = edges[1] - edges[0]
        assert edges[0] <= low and edges[-2] <= high < edges[-1] and len(edges) - 1 <= 25
        assert width in {1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500}
    report = inspect_dataset(
        smollm2_tokenizer(), [PROMPT_COMPLETION, CHAT], console=Console(file=open(os.devnull, "w"))
    )
    histogram = report.length_histogram()
    assert sum(histogram["counts"]) == 2 and histogram["bin_edges"][0] <= min(report.lengths)


def test_cli_inspect_config_shows_exactly_what_the_recipe_trains(tmp_path, capsys):
    import sft  # recipes/ is on sys.path (tests/conftest.py)

    stats_path, html_path = tmp_path / "stats.json", tmp_path / "report.html"
    argv = ["inspect", "--config", DEFAULT_YAML, "-n", "1", "--no-progress"]
    assert main([*argv, "--stats-json", str(stats_path), "--html", str(html_path)]) == 0
    stats = json.loads(stats_path.read_text())

    # The recipe's own preparation of its training rows (no training): the trainer's prepare_dataset.
    recipe, args = sft.parse_config([sft.RecipeConfig, sft.ShiftLossArguments], ["--config", DEFAULT_YAML])
    directory, gguf_file = sft.model_source(recipe)
    tokenizer = sft.load_tokenizer(directory, gguf_file=gguf_file)
    train_rows, _, source = sft.load_splits(recipe)
    encoder = Encoder(tokenizer, **args.encoder_options())
    expected = prepare_dataset(
        train_rows, encoder, packing=args.packing, on_untrained=args.on_untrained
    ).stats
    assert {key: stats[key] for key in expected.as_dict()} == expected.as_dict()
    assert stats["examples"] == stats["kept_examples"] == len(train_rows) == 132
    assert stats["formats"] == {"messages": 132}  # prompt/completion rows chat-templated, as trained
    assert stats["max_length"] == args.max_length == 384
    data, rows = stats["about"]["data"].split(": ")
    assert (
        os.path.abspath(data) == os.path.abspath(source)
        and rows == "132 training rows (the last 16 held out)"
    )
    tokenizer_dir, tokenizer_file = stats["about"]["tokenizer"].split(" ")
    assert os.path.abspath(tokenizer_dir) == directory and tokenizer_file == f"[{gguf_file}]"

    report = ReportParser()
    report.feed(html_path.read_text(encoding="utf-8"))
    assert report.about["config"] == DEFAULT_YAML and report.about["train_on"] == "completion"
    assert report.examples[0]["trained"].endswith("return False<|im_end|>")
    assert report.examples[0]["text"].startswith("<|im_start|>system⏎")

    # The recipe decides the tokenizer, the data and the encoding: no second source for them.
    assert main([*argv, "--max-length", "64", "--no-html"]) == 2
    assert "--max-length cannot be given with it" in capsys.readouterr().err


class ScriptJson(HTMLParser):
    """The text of ``<script id="statistics-json">`` as a browser reads it: raw, up to ``</script``."""

    def __init__(self) -> None:
        super().__init__()
        self.text: str | None = None
        self._inside = False

    def handle_starttag(self, tag, attrs):
        self._inside = tag == "script" and dict(attrs).get("id") == "statistics-json"
        if self._inside:
            self.text = ""

    def handle_endtag(self, tag):
        self._inside = False

    def handle_data(self, data):
        if self._inside:
            self.text += data


def test_html_report_statistics_json_parses_as_a_browser_reads_it(tmp_path):
    hostile = '</script><!-- <script> &amp; "quoted" </SCRIPT'
    rows = [PROMPT_COMPLETION, {"text": hostile}, {hostile: "not a known column"}]
    html_path = tmp_path / "report.html"
    report = inspect_dataset(
        smollm2_tokenizer(),
        rows,
        html_path=str(html_path),
        console=Console(file=open(os.devnull, "w")),
        about={"data": hostile, "tokenizer": "SmolLM2"},
        chat_template_kwargs={"note": hostile},
    )
    assert report.failed_examples == 1 and hostile in report.errors[0]  # hostile text in the errors too
    parsed = ScriptJson()
    parsed.feed(html_path.read_text(encoding="utf-8"))
    # JSON.parse(element.textContent): no entity is decoded inside <script>, and nothing ends it early.
    assert not any(character in parsed.text for character in "<>&")
    statistics = json.loads(parsed.text)
    assert statistics == json.loads(json.dumps(report.to_dict()))
    assert statistics["about"]["data"] == statistics["options"]["chat_template_kwargs"]["note"] == hostile
    # The page itself still shows the hostile text as text (entities), not as markup.
    page = ReportParser()
    page.feed(html_path.read_text(encoding="utf-8"))
    assert page.about["data"] == hostile and page.examples[1]["text"].startswith(hostile[:9])


def write_foreign_checkout(root) -> tuple[str, list]:
    """A checkout of someone else's: a config under recipes/configs/, and beside it an sft.py and a
    datasets.py that would leave marker files if anything imported them. Returns (config, markers)."""
    recipes = root / "recipes"
    (recipes / "configs").mkdir(parents=True)
    (root / "data").mkdir()
    markers = [root / "sft-ran", root / "datasets-shadowed"]
    for name, marker in zip(("sft.py", "datasets.py"), markers, strict=True):
        (recipes / name).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    rows = [PROMPT_COMPLETION, {"prompt": "Q: 3+3=", "completion": " 6"}, PROMPT_COMPLETION]
    write_jsonl(root / "data" / "rows.jsonl", rows)
    directory, gguf_file = os.path.split(smollm2_gguf_path())
    config = recipes / "configs" / "foreign.yaml"
    config.write_text(
        f"model_name_or_path: {directory}\ngguf_file: {gguf_file}\ndata_path: data/rows.jsonl\n"
        "eval_rows: 1\nmax_length: 64\n"
    )
    return str(config), markers


def test_cli_inspect_config_runs_no_script_found_beside_it(tmp_path, monkeypatch):
    import sys

    config, markers = write_foreign_checkout(tmp_path / "theirs")
    monkeypatch.chdir(tmp_path)  # data/rows.jsonl is found in the config's checkout, not here
    stats_path = tmp_path / "stats.json"
    argv = ["inspect", "--config", config, "--no-html", "--no-progress", "--stats-json", str(stats_path)]
    assert main(argv) == 0
    assert [marker.exists() for marker in markers] == [False, False]
    assert str(tmp_path / "theirs" / "recipes") not in sys.path
    import datasets

    assert not datasets.__file__.startswith(str(tmp_path))
    stats = json.loads(stats_path.read_text())
    assert stats["examples"] == 2 and stats["formats"] == {"messages": 2} and stats["max_length"] == 64
    assert stats["about"]["recipe"] == "hf_shift_loss.recipe (as recipes/sft.py reads it; no script run)"
    assert stats["about"]["data"].endswith("rows.jsonl: 2 training rows (the last 1 held out)")


def test_cli_inspect_recipe_runs_only_the_script_named(tmp_path, monkeypatch):
    import sys

    config, markers = write_foreign_checkout(tmp_path / "theirs")
    monkeypatch.chdir(tmp_path / "theirs")
    marker = tmp_path / "mine-ran"
    mine = tmp_path / "mine" / "my_inspect_recipe.py"
    mine.parent.mkdir()
    mine.write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from hf_shift_loss.config import ShiftLossArguments, parse_config\n"
        "from hf_shift_loss.data.load import load_tokenizer\n"
        "from hf_shift_loss.recipe import RecipeConfig, load_splits, model_source\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_inspect_recipe", raising=False)
    stats_path = tmp_path / "stats.json"
    argv = ["inspect", "--config", config, "--recipe", str(mine), "--no-html", "--no-progress"]
    assert main([*argv, "--stats-json", str(stats_path)]) == 0
    assert marker.exists() and [marker.exists() for marker in markers] == [False, False]
    assert sys.path[-1] == str(mine.parent)  # after the installed packages: nothing there shadows them
    stats = json.loads(stats_path.read_text())
    assert stats["examples"] == 2 and os.path.abspath(stats["about"]["recipe"]) == str(mine)
    missing = tmp_path / "nowhere.py"
    with pytest.raises(SystemExit, match="--recipe .*nowhere.py: no such file"):
        main(["inspect", "--config", config, "--recipe", str(missing)])
