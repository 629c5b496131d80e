"""PolicyScheduler under data-parallel training: every rank must set the same hyperparameters.

Two real processes (``torch.distributed.run``, gloo on CPU) step a scheduler on losses that differ per
rank, as each rank's shard gives them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from agents import PolicyScheduler

_RANKS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from agents import PolicyScheduler

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}
    runs = {
        "synced": {},
        "sampled": {"deterministic": False, "seed": rank},
        "grouped": {"decisions": 3},  # decisions at calls 2, 4 and 6; every call's losses are averaged
        "rank0_evaluates": {"decisions": 3},  # only rank 0 passes a validation loss
        # Last, without collectives: a rank that tears the group down while another still finishes a
        # collective aborts that one (gloo: "terminate called without an active exception").
        "unsynced": {"sync_ranks": False},
    }
    for name, kwargs in runs.items():
        torch.manual_seed(0)
        opt = torch.optim.SGD(torch.nn.Linear(4, 1).parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        sched = PolicyScheduler.from_pretrained("default", opt, total_steps=6, epochs=6, **kwargs)
        values = []
        for t in range(6):  # each rank's own losses: they differ between ranks, in level and in shape
            val = None if name == "rank0_evaluates" and rank == 1 else (1 + rank) / (t + 1) ** (1 + rank)
            sched.step(val, train_loss=1.2 * (1 + rank) / (t + 1) ** (1 + rank))
            values.append([opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]])
        out[name] = {"values": values, "sync_ranks": sched.sync_ranks}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_ranks_with_different_losses_set_the_same_hyperparameters(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    done = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["synced"]["sync_ranks"] and not rank0["unsynced"]["sync_ranks"]  # on by default under DDP
    for name in ("synced", "sampled", "grouped", "rank0_evaluates"):  # rank 0's decision everywhere
        assert rank0[name]["values"] == rank1[name]["values"]
    assert rank0["unsynced"]["values"] != rank1["unsynced"]["values"]  # what the sync prevents
    # The decisions are those a single process makes on the ranks' mean losses.
    for name, kwargs in (("synced", {}), ("grouped", {"decisions": 3}), ("rank0_evaluates", {"decisions": 3})):
        torch.manual_seed(0)
        opt = torch.optim.SGD(torch.nn.Linear(4, 1).parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        single = PolicyScheduler.from_pretrained("default", opt, total_steps=6, epochs=6, **kwargs)
        values = []
        for t in range(6):  # the validation loss is averaged over the ranks that gave one
            val = 1.0 / (t + 1) if name == "rank0_evaluates" else (1.0 / (t + 1) + 2.0 / (t + 1) ** 2) / 2
            single.step(val, train_loss=(1.2 / (t + 1) + 2.4 / (t + 1) ** 2) / 2)
            values.append([opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]])
        np.testing.assert_allclose(rank0[name]["values"], values, rtol=1e-6)
    grouped = rank0["grouped"]["values"]
    assert grouped[0] == [0.01, 1e-4] and grouped[2] == grouped[1] and grouped[4] == grouped[3]  # held in between


def test_sync_ranks_without_a_process_group_is_refused():
    opt = torch.optim.SGD(torch.nn.Linear(4, 1).parameters(), lr=0.01, weight_decay=1e-4)
    with pytest.raises(ValueError, match="sync_ranks=True needs an initialised torch.distributed process group"):
        PolicyScheduler.from_pretrained("default", opt, total_steps=6, epochs=6, sync_ranks=True)
    assert not PolicyScheduler.from_pretrained("default", opt, total_steps=6, epochs=6).sync_ranks
    # A flag as the other flags take it: NumPy's bool too; a truthy stand-in is refused, naming it.
    assert (
        PolicyScheduler.from_pretrained("default", opt, total_steps=6, epochs=6, sync_ranks=np.False_).sync_ranks
        is False
    )
    with pytest.raises(TypeError, match="sync_ranks must be True, False or None .*, got 'no'"):
        PolicyScheduler.from_pretrained("default", opt, total_steps=6, epochs=6, sync_ranks="no")
