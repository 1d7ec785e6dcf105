"""benchmarks/harness.py, and the docs sections the benchmarks write: regenerated from the committed results
JSON, each is exactly what docs/performance.md holds (so a writer cannot drift from its section)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_compile  # noqa: E402
import bench_data  # noqa: E402
import bench_loss  # noqa: E402
import bench_sft  # noqa: E402
import harness  # noqa: E402


def committed_section(heading: str) -> str:
    text = (REPO / "docs" / "performance.md").read_text()
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)].rstrip("\n")


def test_loss_section_regenerates_unchanged() -> None:
    saved, results = bench_loss.load_results(BENCHMARKS / "results_loss.json")
    section = bench_loss.section_text(saved, results, saved["analysis"])
    assert section.rstrip("\n") == committed_section(bench_loss.SECTION_HEADING)


def test_sft_section_regenerates_unchanged() -> None:
    saved = json.loads((BENCHMARKS / "results_sft.json").read_text())
    assert bench_sft.section_text(saved).rstrip("\n") == committed_section(bench_sft.SECTION_HEADING)


def test_compile_section_regenerates_unchanged() -> None:
    saved = json.loads((BENCHMARKS / "results_compile.json").read_text())
    assert bench_compile.section_text(saved).rstrip("\n") == committed_section(bench_compile.SECTION_HEADING)


def test_data_section_regenerates_unchanged() -> None:
    saved = json.loads((BENCHMARKS / "results_data.json").read_text())
    assert bench_data.section_text(saved).rstrip("\n") == committed_section(bench_data.SECTION_HEADING)


def test_markdown_table() -> None:
    table = harness.markdown_table(["a", "b", "c"], [[1, "x", 2.5], ["", "y", None]], "rc")
    assert table == "| a | b | c |\n|---:|:-:|---|\n| 1 | x | 2.5 |\n|  | y | None |"
    assert harness.ratio(3.0, 2.0) == "1.50"
    assert harness.ratio(3.0, 0) == "n/a"


def test_write_section_replaces_or_inserts(tmp_path: Path) -> None:
    path = tmp_path / "performance.md"
    path.write_text("# Performance\n\n## A\n\nold a\n\n## C\n\nc\n")
    harness.write_section("## A", "## A\n\nnew a\n", path=path)
    harness.write_section("## B", "## B\n\nb\n", before="## C", path=path)
    harness.write_section("## D", "## D\n\nd\n", path=path)
    assert path.read_text() == "# Performance\n\n## A\n\nnew a\n\n## B\n\nb\n\n## C\n\nc\n\n## D\n\nd\n"


def test_save_results_keeps_what_is_written_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"device": "old", "analysis": "by hand", "results": [1], "earlier_runs": [0]}))
    saved = harness.save_results(path, {"results": [2], "device": "new"})
    assert saved == {"device": "new", "analysis": "by hand", "results": [2], "earlier_runs": [0]}
    assert list(json.loads(path.read_text())) == ["device", "analysis", "results", "earlier_runs"]
    assert harness.save_results(tmp_path / "fresh.json", {"results": []})["analysis"] == ""


WORKER_SCRIPT = """
import sys
sys.path.insert(0, {benchmarks!r})
from harness import serve_worker

def worker(x: int, name: str) -> dict:
    print("noise before the result")
    if x < 0:
        raise ValueError("negative x")
    return {{"double": 2 * x, "name": name}}

if not serve_worker(worker):
    print("not a worker")
"""


def test_worker_protocol(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(WORKER_SCRIPT.format(benchmarks=str(BENCHMARKS)))
    assert harness.run_worker(str(script), {"x": 21, "name": "n"}) == {"double": 42, "name": "n"}
    with pytest.raises(RuntimeError, match="negative x"):
        harness.run_worker(str(script), {"x": -1, "name": "n"})
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert plain.stdout == "not a worker\n"


def test_measure_steps_reads_time_memory_and_loss() -> None:
    torch = pytest.importorskip("torch")
    hidden, weight, labels = harness.loss_inputs(8, 4, 16, 0.5, "float32", "cpu", sequence_length=4)
    assert hidden.shape == (2, 4, 4) and weight.shape == (16, 4) and hidden.requires_grad
    assert labels[:, :2].eq(-100).all() and labels[:, 2:].ge(0).all()
    calls = []

    def loss_fn():
        calls.append(1)
        return torch.nn.functional.linear(hidden, weight).square().mean()

    m = harness.measure_steps(loss_fn, (hidden, weight), "cpu", warmup=2, repetitions=3)
    assert len(calls) == 2 + 1 + 3
    assert len(m["seconds_all"]) == 3 and m["seconds_median"] == sorted(m["seconds_all"])[1]
    assert m["warmup_seconds"] > 0 and m["cpu_seconds_median"] >= 0 and m["peak_extra_bytes"] >= 0
    assert m["loss"] == pytest.approx(float(loss_fn().detach()))
    assert weight.grad is not None


def test_device_description_names_the_cpu() -> None:
    pytest.importorskip("torch")
    description = harness.device_description("cpu")
    assert description.startswith("CPU (") and " cores, torch " in description and " threads)" in description
