"""The benchmark harness: what every script in benchmarks/ shares (the worker processes and their JSON
protocol, the device description, memory and time readings, tables, results files and the
docs/performance.md section writer), so that each script holds only its cases, implementations and text.
benchmarks/README.md shows how a script uses it.

Standard library only at import time (torch and matplotlib are imported inside the functions that need
them), so that a worker process starts at no extra cost.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PERFORMANCE_MD = REPO / "docs" / "performance.md"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}
WORKER_FLAG = "--worker"
HAND_WRITTEN = ("analysis", "earlier_runs")  # keys of a results JSON written by hand, kept across runs

# ---------------------------------------------------------------------------------------------- processes


def run_command(command: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` in the repository root, offline (:data:`OFFLINE_ENV`, plus ``env``), output captured."""
    return subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV, **(env or {})},
    )


def run_worker(script: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script``'s worker on ``spec`` in a process of its own and return the dict it printed.

    Raises ``RuntimeError`` with the end of the worker's stderr when it fails.
    """
    result = run_command([sys.executable, script, WORKER_FLAG, json.dumps(spec)], env)
    if result.returncode != 0:
        raise RuntimeError(f"worker {json.dumps(spec)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def serve_worker(worker: Callable[..., dict[str, Any]]) -> bool:
    """The worker's side of :func:`run_worker`: with ``--worker SPEC`` on the command line, print
    ``json.dumps(worker(**SPEC))`` as the last line of stdout and return True; otherwise return False."""
    if WORKER_FLAG not in sys.argv:
        return False
    spec = json.loads(sys.argv[sys.argv.index(WORKER_FLAG) + 1])
    print(json.dumps(worker(**spec)))
    return True


def command_line(description: str | None, from_json: bool = True) -> argparse.ArgumentParser:
    """A benchmark's command line: ``description`` (its module docstring) as the help and, with
    ``from_json``, ``--from-json PATH``: rewrite its docs section from saved results, measure nothing."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if from_json:
        parser.add_argument(
            "--from-json", type=Path, help="rewrite the docs from saved results, measure nothing"
        )
    return parser


def import_loss_modules_only() -> None:
    """Make the ``hf_shift_loss`` modules importable without the package's ``__init__``.

    The loss modules need only torch; the package's ``__init__`` imports the trainer (transformers'
    Trainer, datasets, ...): seconds of start-up in each of a benchmark's worker processes. Nothing
    measured is affected.
    """
    import types

    sys.path.insert(0, str(REPO))
    if "hf_shift_loss" not in sys.modules:
        package = types.ModuleType("hf_shift_loss")
        package.__path__ = [str(REPO / "hf_shift_loss")]
        sys.modules["hf_shift_loss"] = package


# ---------------------------------------------------------------------------------------------- readings


def device_description(device: str | None = None) -> str:
    """The machine a result was measured on: the GPU's name on CUDA, else the CPU's; with the core count,
    torch's version and its thread count. ``device``: ``"cuda"`` or ``"cpu"`` (default: CUDA if present)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    kind = "" if device == "cuda" else "CPU "
    return f"{kind}({name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, or "n/a"."""
    try:
        with open("/proc/loadavg") as file:
            return " ".join(file.read().split()[:3])
    except OSError:
        return "n/a"


def resident_bytes(field_name: str) -> int:
    """A memory field of /proc/self/status in bytes: ``"VmRSS"`` (now) or ``"VmHWM"`` (the peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(function: Callable[[], Any], device: str, trim: bool = False) -> int:
    """Peak memory of ``function()`` above the memory before it.

    CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated before. CPU: the resident-set
    high-water mark minus the resident set before (``/proc/self/clear_refs`` resets the mark; without it,
    ``ru_maxrss``: a fresh process's peak). With ``trim``, freed heap is given back first (``malloc_trim``),
    so that memory freed by earlier steps and still resident cannot hide the step's own.
    """
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        function()
        return torch.cuda.max_memory_allocated() - baseline
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if reset_peak_rss():
        baseline = resident_bytes("VmRSS")
        function()
        return resident_bytes("VmHWM") - baseline
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    function()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def timed(function: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """Wall-clock and CPU seconds of the process for ``function(*args)``."""
    start, cpu_start = time.perf_counter(), time.process_time()
    function(*args)
    return time.perf_counter() - start, time.process_time() - cpu_start


def median_time(function: Callable[[], Any], repetitions: int) -> tuple[float, Any]:
    """Median wall-clock seconds of ``function()`` over ``repetitions`` calls, and the last call's result."""
    seconds, result = [], None
    for _ in range(repetitions):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def loss_inputs(
    tokens: int,
    hidden_size: int,
    vocab_size: int,
    masked_fraction: float,
    dtype: str,
    device: str,
    trainable_head: bool = True,
    sequence_length: int = 1024,
) -> tuple[Any, Any, Any]:
    """Seeded ``hidden [rows, seq, H]`` (requires grad), ``weight [V, H]`` and ``labels [rows, seq]`` for the loss
    benchmarks: ``seq = min(sequence_length, tokens)``, the first ``masked_fraction`` of every row -100
    (like a prompt)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    seq = min(sequence_length, tokens)
    rows = max(1, tokens // seq)
    dtype = getattr(torch, dtype)
    hidden = torch.randn(rows, seq, hidden_size, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, generator=generator) * 0.02).to(device, dtype)
    weight.requires_grad_(trainable_head)
    labels = torch.randint(0, vocab_size, (rows, seq), generator=generator).to(device)
    labels[:, : int(seq * masked_fraction)] = -100
    return hidden, weight, labels


def measure_steps(
    loss_fn: Callable[[], Any],
    parameters: Sequence[Any],
    device: str,
    warmup: int,
    repetitions: int,
    trim: bool = False,
) -> dict[str, Any]:
    """Forward + backward of ``loss_fn()`` (a scalar loss; ``parameters`` get their ``.grad`` cleared first):
    ``warmup`` steps, then one step for the peak extra memory (:func:`peak_extra_bytes` with ``trim``; with
    ``warmup=0`` the cold first step), then ``repetitions`` timed steps (wall and process CPU time, CUDA synchronized).

    Returns ``seconds_all``, ``seconds_median``, ``cpu_seconds_median``, ``warmup_seconds`` (the first
    warm-up step's, 0.0 without one), ``peak_extra_bytes`` and ``loss`` (the last step's).
    """
    import torch

    cpu_seconds: list[float] = []
    last: dict[str, float] = {}

    def step() -> float:
        for parameter in parameters:
            parameter.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

        def forward_backward() -> None:
            loss = loss_fn()
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            last["loss"] = float(loss.detach())

        seconds, cpu = timed(forward_backward)
        cpu_seconds.append(cpu)
        return seconds

    warmup_seconds = [step() for _ in range(warmup)]
    for parameter in parameters:
        parameter.grad = None
    peak = peak_extra_bytes(step, device, trim)
    cpu_seconds.clear()
    seconds = [step() for _ in range(repetitions)]
    return {
        "seconds_all": seconds,
        "seconds_median": statistics.median(seconds),
        "cpu_seconds_median": statistics.median(cpu_seconds),
        "warmup_seconds": warmup_seconds[0] if warmup_seconds else 0.0,
        "peak_extra_bytes": peak,
        "loss": last["loss"],
    }


# ---------------------------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A markdown table; ``align`` holds one letter per column, ``l`` (default), ``r`` or ``c``."""
    rule = {"l": "---", "r": "---:", "c": ":-:"}
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "".join(rule[a] + "|" for a in align.ljust(len(headers), "l")),
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: float, b: float) -> str:
    """``a / b`` with two decimals, "n/a" where ``b`` is not positive."""
    return f"{a / b:.2f}" if b > 0 else "n/a"


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``matplotlib.pyplot.subplots`` on the file-only Agg backend (matplotlib is imported here, not by workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def grouped_bars(axis: Any, series: dict[str, Sequence[float]], width: float) -> list[Any]:
    """One bar per group (at 0, 1, ...) and series, the series side by side; returns the bar containers."""
    middle = (len(series) - 1) / 2
    return [
        axis.bar([i + (offset - middle) * width for i in range(len(values))], values, width, label=label)
        for offset, (label, values) in enumerate(series.items())
    ]


def save_figure(figure: Any, path: Path) -> None:
    """Lay ``figure`` out and write it to ``path`` (a PNG of docs/img, 100 dpi)."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def save_results(path: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """Write ``saved`` to the results JSON at ``path``, keeping what is written there by hand
    (:data:`HAND_WRITTEN`: the ``"analysis"`` before the results, ``"earlier_runs"`` after them); returns
    what was written."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    results = saved["results"]
    saved = {key: value for key, value in saved.items() if key != "results"}
    saved |= {"analysis": previous.get("analysis", ""), "results": results}
    saved |= {key: previous[key] for key in HAND_WRITTEN[1:] if key in previous}
    path.write_text(json.dumps(saved, indent=1) + "\n")
    return saved


def write_section(heading: str, section: str, before: str | None = None, path: Path = PERFORMANCE_MD) -> None:
    """Replace the section headed ``heading`` (up to the next ``## ``) of docs/performance.md with ``section``,
    or add it before the section headed ``before`` (at the end without one), leaving the others untouched."""
    text = path.read_text() if path.exists() else "# Performance\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    before_match = re.search(rf"^{re.escape(before)}\n", text, re.M) if before is not None else None
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    elif before_match is not None:
        text = text[: before_match.start()] + section.rstrip("\n") + "\n\n" + text[before_match.start() :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
