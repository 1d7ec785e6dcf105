"""Multi-node launches: two "machines" on one host, one gloo rank each, give the one-process update.

Each "machine" is its own ``accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip
127.0.0.1`` (one process each, ``--num_processes 2`` counting both), started at the same time: the same
code path as a real multi-node job (static rendezvous at machine 0's address, ranks numbered across
machines), so it proves the launcher configs and the rank/world bookkeeping; not the network. DDP uses
recipes/accelerate/multi_node.yaml itself with this host's address, FSDP2 tests/dist_scripts/fsdp2_cpu.yaml
with the same flags. One SGD step over the 8 examples (1 rank x batch 2 x accumulation 2 per machine) and
an evaluation are compared with one process (tests/conftest.py's ``one_process_variants``).
"""

from __future__ import annotations

import os
import sys

import pytest
from test_distributed import ROOT, SCRIPT, _execute, _free_port, _max_relative_difference, read_variants

pytestmark = pytest.mark.slow

CONFIGS = {
    "ddp": os.path.join(ROOT, "recipes", "accelerate", "multi_node.yaml"),
    "fsdp2": os.path.join(ROOT, "tests", "dist_scripts", "fsdp2_cpu.yaml"),
}
VARIANTS = {"ddp": ["untied-eager", "untied-fused"], "fsdp2": ["untied-fused", "tied-fused"]}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def two_machines(request, tmp_path_factory) -> tuple[str, dict[str, dict]]:
    """(engine, results per variant) of one job over two "machines" of one process each."""
    engine = request.param
    out = str(tmp_path_factory.mktemp(f"two_machines_{engine}"))
    port = str(_free_port())
    machines = [
        [
            *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIGS[engine]),
            *("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)),
            *("--main_process_ip", "127.0.0.1", "--main_process_port", port),
            *("--mixed_precision", "no", "--dynamo_backend", "no"),
            SCRIPT,
            *("--out", out, "--per-device-batch", "2", "--accumulation", "2"),
            *("--variants", ",".join(VARIANTS[engine]), "--evaluate"),
        ]
        for rank in (0, 1)
    ]
    _execute(*machines, timeout_s=300)
    return engine, read_variants(out, VARIANTS[engine])


def test_two_machines_equal_one_process(one_process_variants, two_machines):
    engine, results = two_machines
    for variant, two in results.items():
        one = one_process_variants[variant]
        assert two["world_size"] == 2
        assert two["fused"] == variant.endswith("fused")
        # Ranks are numbered across machines: machine 1's process is rank 1 and got its own shards.
        assert two["batches"] == {"rank0": [[0, 1], [4, 5]], "rank1": [[2, 3], [6, 7]]}
        assert set(two["update"]) == set(one["update"])
        worst = _max_relative_difference(two["update"], one["update"])
        assert worst < 1e-4, (engine, variant, worst)
        assert two["logged_loss"] == pytest.approx(one["reference_token_mean"], rel=1e-5)
        assert two["eval_trained_tokens"] == one["eval_trained_tokens"] == 146
        assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
