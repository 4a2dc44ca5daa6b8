"""Rank grid and process groups: membership against Megatron's formula, and a collective per group."""

import itertools

import pytest
import torch
import torch.distributed as dist

from megatron_lite.config import ConfigError
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.parallel_state import ParallelState, first_slurm_host, group_ranks, launch_env


def layouts(world):
    return [
        (tp, pp) for tp, pp in itertools.product([1, 2, 4, 8], repeat=2) if world % (tp * pp) == 0
    ]


def expected_coords(rank, tp, dp):
    """Inverse of rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank."""
    return rank // (dp * tp), (rank // tp) % dp, rank % tp


def test_design_doc_example_tp2_pp2_of_8():
    g = group_ranks(8, tp=2, pp=2)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sorted(g["dp"]) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(g["pp"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert sorted(g["embedding"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_groups_match_formula_for_every_layout(world):
    for tp, pp in layouts(world):
        dp = world // (tp * pp)
        g = group_ranks(world, tp, pp)
        for kind, size, count in (
            ("tp", tp, world // tp),
            ("dp", dp, world // dp),
            ("pp", pp, world // pp),
        ):
            assert len(g[kind]) == count and all(len(r) == size for r in g[kind])
            # the groups of one kind partition the ranks
            assert sorted(itertools.chain(*g[kind])) == list(range(world))
        for ranks in g["tp"]:
            coords = [expected_coords(r, tp, dp) for r in ranks]
            assert len({c[:2] for c in coords}) == 1 and [c[2] for c in coords] == list(range(tp))
        for ranks in g["dp"]:
            coords = [expected_coords(r, tp, dp) for r in ranks]
            assert len({(c[0], c[2]) for c in coords}) == 1
            assert [c[1] for c in coords] == list(range(dp))
        for ranks in g["pp"]:
            coords = [expected_coords(r, tp, dp) for r in ranks]
            assert len({c[1:] for c in coords}) == 1 and [c[0] for c in coords] == list(range(pp))
        for ranks, emb in zip(g["pp"], g["embedding"]):
            assert emb == sorted({ranks[0], ranks[-1]})


@pytest.mark.parametrize("world,tp,pp", [(6, 4, 1), (8, 3, 1), (4, 2, 3)])
def test_sizes_that_do_not_divide_world_are_rejected(world, tp, pp):
    with pytest.raises(ConfigError, match=rf"world size \({world}\) must be divisible"):
        group_ranks(world, tp, pp)


def _check_all_layouts():
    rank, world = dist.get_rank(), dist.get_world_size()
    checked = []
    for tp, pp in layouts(world):
        ps = ParallelState.build(tp=tp, pp=pp)
        dp = world // (tp * pp)
        assert (ps.pp_rank, ps.dp_rank, ps.tp_rank) == expected_coords(rank, tp, dp)
        assert (ps.tp_size, ps.pp_size, ps.dp_size) == (tp, pp, dp)
        assert ps.is_first_stage == (ps.pp_rank == 0) and ps.is_last_stage == (ps.pp_rank == pp - 1)
        assert ps.prev_rank == ps.pp_ranks[(ps.pp_rank - 1) % pp]
        assert ps.next_rank == ps.pp_ranks[(ps.pp_rank + 1) % pp]
        assert (
            ps.rank == ps.pp_ranks[ps.pp_rank] == ps.dp_ranks[ps.dp_rank] == ps.tp_ranks[ps.tp_rank]
        )
        # a collective in each group reaches exactly that group's members
        for group, ranks in (
            (ps.tp_group, ps.tp_ranks),
            (ps.dp_group, ps.dp_ranks),
            (ps.pp_group, ps.pp_ranks),
            (ps.mp_group, None),
            (ps.embedding_group, ps.embedding_ranks),
        ):
            if ranks is None:
                ranks = [r for r in range(world) if (r // tp) % dp == ps.dp_rank]
            if rank not in ranks:
                continue
            t = torch.tensor([float(rank), 1.0])
            dist.all_reduce(t, group=group)
            assert t.tolist() == [float(sum(ranks)), float(len(ranks))], (tp, pp, ranks, t)
        checked.append((tp, pp))
    return checked


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_layout_builds_groups_and_collectives_reach_members(world):
    results = run_distributed(_check_all_layouts, world, timeout=120)
    assert all(r == layouts(world) for r in results)


def test_launch_env_reads_slurm_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-04,09],login1")
    env = launch_env()
    assert (env["rank"], env["world_size"], env["local_rank"]) == (5, 8, 1)
    assert env["master_addr"] == "gpu03"


@pytest.mark.parametrize(
    "nodelist,first", [("node1", "node1"), ("a,b", "a"), ("n[7-9]", "n7"), ("x[2,5],y", "x2")]
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_known_gpus_give_a_peak_for_mfu(monkeypatch):
    from megatron_lite import device

    assert device.peak_tflops(torch.device("cpu")) is None
    for name, peak in (
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Some Future GPU", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, n=name: n)
        assert device.peak_tflops(torch.device("cuda", 0)) == peak, name
