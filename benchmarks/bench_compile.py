"""The sync-free fused loss under torch.compile against the eager fused loss: forward+backward time and memory.

Implementations, each run in its own subprocess (one's allocator state, compiled code and peak memory
cannot leak into another's numbers):

- ``fused``: ``fused_linear_cross_entropy(hidden, weight, labels)``, the default mode (eager): selects the
  trained rows (``nonzero``, a host sync) and projects only those.
- ``sync_free``: ``fused_linear_cross_entropy(..., sync_free=True)``, eager: every row, the untrained ones
  masked inside; fixed shapes, no host sync.
- ``compiled``: the same sync-free call inside ``torch.compile(fullgraph=True, dynamic=False)`` (Inductor).

Each worker runs one warm-up step (for ``compiled``, the compilation: its time is reported separately),
then measures the peak extra memory of one step and the median time of ``--repetitions`` steps.
Peak extra memory: the resident-set high-water mark during the step minus the resident set before it
(``/proc/self/clear_refs`` resets the mark). Large allocations are served by ``mmap`` and given back to
the system when freed (``MALLOC_MMAP_THRESHOLD_`` fixed, ``malloc_trim`` before the step), so memory freed
by the warm-up does not hide the step's own. It includes the gradients wrt hidden and weight.

Usage::

    python benchmarks/bench_compile.py            # N=2048, H=1024, V=32000, 0% and 50% masked; writes results_compile.json
    python benchmarks/bench_compile.py --quick    # small shapes, prints only
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMPLEMENTATIONS = ("fused", "sync_free", "compiled")
SEQUENCE_LENGTH = 1024  # tokens per row; the masked fraction masks the start (the prompt) of every row


@dataclass
class Case:
    tokens: int
    hidden_size: int
    vocab_size: int
    masked_fraction: float
    dtype: str


@dataclass
class Measurement:
    implementation: str
    seconds_median: float
    seconds_all: list[float]
    warmup_seconds: float
    peak_extra_bytes: int
    loss: float


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_worker(case: Case, implementation: str, repetitions: int) -> Measurement:
    import torch

    sys.path.insert(0, str(REPO))
    from hf_shift_loss.fused import fused_linear_cross_entropy

    dtype = getattr(torch, case.dtype)
    generator = torch.Generator().manual_seed(0)
    rows = max(1, case.tokens // SEQUENCE_LENGTH)
    seq = case.tokens // rows
    hidden = torch.randn(rows, seq, case.hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(case.vocab_size, case.hidden_size, generator=generator) * 0.02).to(dtype)
    weight.requires_grad_()
    labels = torch.randint(0, case.vocab_size, (rows, seq), generator=generator)
    labels[:, : int(seq * case.masked_fraction)] = -100

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, labels, sync_free=implementation != "fused")

    if implementation == "compiled":
        loss_fn = torch.compile(loss_fn, fullgraph=True, dynamic=False)

    def step() -> float:
        hidden.grad = None
        weight.grad = None
        start = time.perf_counter()
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        seconds = time.perf_counter() - start
        step.loss = float(loss.detach())
        return seconds

    warmup_seconds = step()
    hidden.grad = weight.grad = None
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = _resident_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    step()
    peak_extra = _resident_bytes("VmHWM") - baseline
    seconds = [step() for _ in range(repetitions)]
    return Measurement(
        implementation, statistics.median(seconds), seconds, warmup_seconds, peak_extra, step.loss
    )


def measure(case: Case, implementation: str, repetitions: int) -> Measurement:
    command = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps({"case": asdict(case), "implementation": implementation, "repetitions": repetitions}),
    ]
    # Every allocation over 64 KiB is an mmap, returned to the system when freed (glibc otherwise raises
    # this threshold as blocks are freed, and freed memory would stay resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{implementation} on {case} failed:\n{result.stderr[-3000:]}")
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


def device_description() -> str:
    import platform

    import torch

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes; prints only")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        measurement = run_worker(Case(**spec["case"]), spec["implementation"], spec["repetitions"])
        print(json.dumps(asdict(measurement)))
        return

    shape = (1024, 256, 8000) if args.quick else (2048, 1024, 32000)
    cases = [Case(*shape, masked, "float32") for masked in (0.5, 0.0)]
    results = []
    for case in cases:
        measured = {}
        for implementation in IMPLEMENTATIONS:
            m = measure(case, implementation, args.repetitions)
            measured[implementation] = m
            print(
                f"{case} {implementation}: {m.seconds_median:.2f}s (warm-up {m.warmup_seconds:.1f}s) "
                f"{m.peak_extra_bytes / 2**20:.0f} MiB loss={m.loss:.6f}",
                flush=True,
            )
        losses = [m.loss for m in measured.values()]
        if max(losses) - min(losses) > 1e-4 * abs(losses[0]):
            raise RuntimeError(f"implementations disagree on the loss for {case}: {losses}")
        fused = measured["fused"]
        ratios = {
            name: {
                "time_vs_fused": m.seconds_median / fused.seconds_median,
                "memory_vs_fused": m.peak_extra_bytes / max(fused.peak_extra_bytes, 1),
            }
            for name, m in measured.items()
        }
        results.append(
            {"case": asdict(case), "measured": {n: asdict(m) for n, m in measured.items()}, "ratios": ratios}
        )
        for name, ratio in ratios.items():
            print(
                f"  {name}: time {ratio['time_vs_fused']:.2f}x fused, memory {ratio['memory_vs_fused']:.2f}x"
            )

    if not args.quick:
        saved = {"device": device_description(), "repetitions": args.repetitions, "results": results}
        (REPO / "benchmarks" / "results_compile.json").write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
