"""benchmarks/gpu_suite.py runs on CPU (``--device cpu --small``): the GPU suite cannot rot unseen.

Its own process, as a user runs it: fused-vs-eager correctness in bf16, the loss benchmark at tiny sizes
(ours, TRL's fused head both ways, torch, transformers; Liger-Kernel and cut-cross-entropy skipped with a
message, they need CUDA), and one step of the recipe with a random tiny Llama.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("trl")


@pytest.mark.slow
def test_gpu_suite_runs_on_cpu_small(tmp_path: Path) -> None:
    out = tmp_path / "gpu_suite.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_suite.py"),
            "--device",
            "cpu",
            "--small",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,  # ~30-60 s on 2 cores; the bound only stops a hang
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["small"] is True

    assert results["model_parallel"]["passed"], results["model_parallel"]

    correctness = results["correctness"]
    assert correctness["passed"], correctness
    assert correctness["fused_bf16_error"]["loss"] < 1e-2

    by_name = {r["implementation"]: r for r in results["loss"]}
    for name in ("ours", "trl_trained", "trl_all", "torch", "transformers"):
        assert "seconds" in by_name[name], by_name[name]
    reference = by_name["transformers"]["loss"]
    for name in ("ours", "trl_trained", "trl_all"):
        assert abs(by_name[name]["loss"] - reference) < 1e-2 * abs(reference), (name, by_name[name])
    for name in ("liger", "cce"):
        assert "CUDA only" in by_name[name]["skipped"]
    assert "skipped: Liger-Kernel" in completed.stdout

    recipe = results["recipe"]
    assert recipe["returncode"] == 0, recipe
    assert recipe["trained_line"].startswith("trained 1 steps")
