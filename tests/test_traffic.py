"""Exact communication of a training step under `mpirun -n 2` (issue: traffic as the table says).

tests/mpi_scripts/traffic.py runs one real Trainer step of `tiny` (batch 4) and records every
communication event of that step on each rank. The activation events must be exactly
`partition.step_transfers` (same layers, ops, directions and bytes, in order), and the batch must
cross as uint8 pixels. The paper-scale volumes (21,632 / 4,608 / 2,048 / 2,048 floats) are
checked in test_partition.py from the same table.
"""

import json

import pytest
from conftest import run_ranks, script
from mpi_scripts.jobs import job_tag, no_leftover_processes  # noqa: F401 (fixtures)

from dualgpu_alexnet import config, partition

BATCH, SIDE = 4, 99  # the script's batch; tiny's input side
VARIANTS = {"split": [], "fc8-device0": ["model.fc8=device0"],
            "lrn-across-devices": ["model.lrn_scope=all"]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def recorded(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    overrides = VARIANTS[request.param]
    args = [script("traffic.py"), str(out)] + [a for o in overrides for a in ("--set", o)]
    proc = run_ranks(args, n=2, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = config.load("tiny", [f"train.batch_size={BATCH}", *overrides])
    return cfg, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _activation_events(record: dict) -> list[tuple]:
    return [tuple(e) for e in record["events"] if e[2] in ("fwd", "bwd")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rank", [0, 1])
def test_step_traffic_equals_the_split_table(recorded, rank):
    cfg, records = recorded
    expected = [(t.layer, t.op, t.direction, t.nbytes)
                for t in partition.step_transfers(cfg, BATCH, world_size=2, rank=rank)]
    assert _activation_events(records[rank]) == expected
    others = {(e[0], e[1]) for e in records[rank]["events"] if e[2] not in ("fwd", "bwd")}
    assert others == {("batch", "bcast"), ("flags", "allreduce")}  # nothing else moves


@pytest.mark.timeout(120)
def test_tiny_crossing_bytes_in_closed_form(recorded):
    cfg, records = recorded
    # per image per direction: conv3 gets 32/2 channels x 5 x 5, fc6..fc8 get 128/2 features
    floats = {"conv3": 16 * 5 * 5, "fc6": 64, "fc7": 64, "fc8": 64}
    for rank in (0, 1):
        for layer, op, direction, nbytes in _activation_events(records[rank]):
            if layer == "logits":  # rank 1 sends its 5 of the 10 logits (and gets their grads)
                assert nbytes == (BATCH * 5 * 4 if (rank == 1) == (direction == "fwd") else 0)
            elif op == "shift":  # LRN halo: 2 channels of 23x23 (conv1) or 11x11 (conv2) up
                side = {"conv1.lrn": 23, "conv2.lrn": 11}[layer]  # from rank 0, down from 1
                assert cfg.model.lrn_scope == "all"
                sends = [e[3] for e in _activation_events(records[rank])
                         if e[0] == layer and e[2] == direction]
                assert sends == ([BATCH * 2 * side * side * 4, 0] if rank == 0
                                 else [0, BATCH * 2 * side * side * 4])
            elif op in ("allgather", "reduce_scatter"):
                assert nbytes == BATCH * floats[layer] * 4, (layer, op)
            else:  # fc8 on device 0: rank 1 sends its fc7 half forward, gets its grads back
                assert cfg.model.fc8 == "device0" and layer == "fc8"
                assert nbytes == (BATCH * 64 * 4 if (rank == 1) == (direction == "fwd") else 0)


@pytest.mark.timeout(120)
def test_batch_reaches_rank1_as_uint8(recorded):
    _, records = recorded
    batch_sent = [e[3] for e in records[0]["events"] if e[0] == "batch"]
    # count (int64), pixels (uint8, N x I x I x 3: not 4x as float32), crops/flips/noise (N x 6)
    assert batch_sent == [8, BATCH * SIDE * SIDE * 3, BATCH * 6 * 4]
    assert [e[3] for e in records[1]["events"] if e[0] == "batch"] == [0, 0, 0]
    assert records[1]["received"] == {"dtype": "uint8", "shape": [BATCH, SIDE, SIDE, 3]}
