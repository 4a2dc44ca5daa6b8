"""The rank grid and its process groups.

Megatron's default order (tp fastest, then cp, then dp, then pp):

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank,
    i.e.  grid = arange(world).view(pp, dp, cp, tp)

For 8 ranks with tp=2, pp=2 (cp=1): TP groups [0,1] [2,3] [4,5] [6,7]; DP groups [0,2] [1,3] [4,6]
[5,7]; PP groups [0,4] [1,5] [2,6] [3,7]. With cp > 1 the cp ranks of one sequence are neighbours
after tp (ring attention's p2p stays close), and dense gradients reduce over the dp x cp ranks. A `ParallelState` is built once and handed to whoever needs a group;
no layer reads a global.

Experts (Megatron's placement) use a second grid over the same ranks, order etp-ep-edp-pp:

    expert_grid = arange(world).view(pp, edp, ep, etp),   edp = world / (pp x ep x etp)

so the expert-parallel axis sits inside the data-parallel one (etp = tp here): experts are split over
ranks that hold different data, and expert gradients are reduced over edp only.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lite.config import ConfigError
from megatron_lite.config.parallel import check_world_size
from megatron_lite.device import default_backend


def rank_grid(world_size: int, tp: int, pp: int, cp: int = 1) -> torch.Tensor:
    """`grid[pp_rank, dp_rank, cp_rank, tp_rank] = rank`; raises if the sizes don't fit `world_size`."""
    for name, v in (
        ("tensor-model-parallel-size", tp),
        ("pipeline-model-parallel-size", pp),
        ("context-parallel-size", cp),
    ):
        if v < 1:
            raise ConfigError(f"--{name} must be positive, got {v}")
    check_world_size(world_size, tp, pp, cp)
    return torch.arange(world_size).view(pp, world_size // (tp * pp * cp), cp, tp)


def _lines(g: torch.Tensor, dims: tuple[int, ...]) -> list[list[int]]:
    """The groups of ranks that differ only along grid `dims` (the others fixed), in grid order."""
    rest = [d for d in range(g.dim()) if d not in dims]
    moved = g.permute(*rest, *dims)
    n = 1
    for d in dims:
        n *= g.shape[d]
    return moved.reshape(-1, n).tolist()


# --- expert grid (moe) ---------------------------------------------------------------------------
def expert_grid(world_size: int, pp: int, ep: int, etp: int) -> torch.Tensor:
    """`grid[pp_rank, edp_rank, ep_rank, etp_rank] = rank` (order etp-ep-edp-pp)."""
    if world_size % (pp * ep * etp) != 0:
        raise ConfigError(
            f"world size ({world_size}) must be divisible by --pipeline-model-parallel-size "
            f"({pp}) x --expert-model-parallel-size ({ep}) x --expert-tensor-parallel-size "
            f"({etp}) = {pp * ep * etp}"
        )
    return torch.arange(world_size).view(pp, world_size // (pp * ep * etp), ep, etp)


def expert_group_ranks(world_size: int, pp: int, ep: int, etp: int) -> dict[str, list[list[int]]]:
    """Every ep, etp and edp group, as lists of ranks (a 1-d slice of the expert grid each)."""
    g = expert_grid(world_size, pp, ep, etp)
    return {"ep": _lines(g, (2,)), "etp": _lines(g, (3,)), "edp": _lines(g, (1,))}


# --- dense grid ------------------------------------------------------------------------------------
def group_ranks(
    world_size: int, tp: int, pp: int, cp: int = 1, ep: int = 1, etp: int | None = None
) -> dict[str, list[list[int]]]:
    """Every group of each kind, as lists of ranks (pure function; no process group needed)."""
    g = rank_grid(world_size, tp, pp, cp)  # [pp, dp, cp, tp]
    pp_groups = _lines(g, (0,))
    experts = expert_group_ranks(world_size, pp, ep, tp if etp is None else etp)  # moe
    return {
        **experts,
        "tp": _lines(g, (3,)),
        "dp": _lines(g, (1,)),
        "pp": pp_groups,
        # model parallel = one full model replica (tp x pp): clipping norms and found-inf reduce here
        "mp": _lines(g, (0, 3)),
        # first and last stage share the tied word embedding
        "embedding": [sorted({r[0], r[-1]}) for r in pp_groups],
        # --- context parallelism: the ranks sharing one sequence; dense gradients reduce over dp x cp
        "cp": _lines(g, (2,)),
        "dp_cp": _lines(g, (1, 2)),
    }


@dataclass
class ParallelState:
    """This rank's place in the tp x pp x dp grid, with the groups it belongs to."""

    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup | None = field(repr=False)
    pp_group: dist.ProcessGroup | None = field(repr=False)
    dp_group: dist.ProcessGroup | None = field(repr=False)
    mp_group: dist.ProcessGroup | None = field(repr=False)
    embedding_group: dist.ProcessGroup | None = field(repr=False)
    tp_ranks: list[int]
    pp_ranks: list[int]
    dp_ranks: list[int]
    embedding_ranks: list[int]
    mp_ranks: list[int] = field(default_factory=lambda: [0])  # this replica: pp-major, tp-minor
    vpp_size: int | None = None  # virtual pipeline chunks per rank (interleaved schedule)
    backend: str = "gloo"
    # --- context parallelism (ring attention): this rank holds 1/cp of every sequence
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    cp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_cp_group: dist.ProcessGroup | None = field(default=None, repr=False)  # dense gradients
    dp_cp_ranks: list[int] = field(default_factory=lambda: [0])
    # --- experts (moe): the expert grid of the module docstring ---
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: dist.ProcessGroup | None = field(default=None, repr=False)
    ep_ranks: list[int] = field(default_factory=lambda: [0])
    etp_size: int = 1
    etp_rank: int = 0
    etp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    etp_ranks: list[int] = field(default_factory=lambda: [0])
    edp_size: int = 1
    edp_rank: int = 0
    edp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    edp_ranks: list[int] = field(default_factory=lambda: [0])

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_rank(self) -> int:
        """Global rank of the previous pipeline stage (wraps around, as Megatron's)."""
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def next_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def is_embedding_rank(self) -> bool:
        return self.rank in self.embedding_ranks

    @classmethod
    def build(
        cls,
        tp: int = 1,
        pp: int = 1,
        vpp_size: int | None = None,
        cp: int = 1,
        ep: int = 1,
        etp: int | None = None,
    ) -> ParallelState:
        """Create every group (collectively: all ranks call this, in the same order)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        etp = tp if etp is None else etp
        groups = group_ranks(world, tp, pp, cp, ep, etp)
        mine: dict[str, tuple[list[int], dist.ProcessGroup | None]] = {}
        kinds = ("tp", "dp", "pp", "mp", "embedding", "cp", "dp_cp", "ep", "etp", "edp")
        for kind in kinds:
            seen = set()
            for ranks in groups[kind]:
                key = tuple(ranks)
                if key in seen:  # pp == 1: every embedding group is a single rank, listed once
                    continue
                seen.add(key)
                pg = dist.new_group(ranks)  # every rank creates every group, same order
                if rank in ranks:
                    mine[kind] = (ranks, pg)
        mine.setdefault("embedding", ([], None))  # middle stages hold no embedding
        grid = rank_grid(world, tp, pp, cp)
        pp_rank, dp_rank, cp_rank, tp_rank = (int(i) for i in (grid == rank).nonzero()[0])
        return cls(
            world_size=world,
            rank=rank,
            tp_size=tp,
            pp_size=pp,
            dp_size=world // (tp * pp * cp),
            tp_rank=tp_rank,
            pp_rank=pp_rank,
            dp_rank=dp_rank,
            tp_group=mine["tp"][1],
            pp_group=mine["pp"][1],
            dp_group=mine["dp"][1],
            mp_group=mine["mp"][1],
            embedding_group=mine["embedding"][1],
            tp_ranks=mine["tp"][0],
            pp_ranks=mine["pp"][0],
            dp_ranks=mine["dp"][0],
            embedding_ranks=mine["embedding"][0],
            mp_ranks=mine["mp"][0],
            vpp_size=vpp_size,
            backend=dist.get_backend(),
            cp_size=cp,
            cp_rank=cp_rank,
            cp_group=mine["cp"][1],
            cp_ranks=mine["cp"][0],
            dp_cp_group=mine["dp_cp"][1],
            dp_cp_ranks=mine["dp_cp"][0],
            **_expert_fields(world, rank, pp, ep, etp, mine),
        )

    @classmethod
    def single(cls) -> ParallelState:
        """A one-rank state with no process groups (single-process runs and unit tests)."""
        return cls(
            world_size=1,
            rank=0,
            tp_size=1,
            pp_size=1,
            dp_size=1,
            tp_rank=0,
            pp_rank=0,
            dp_rank=0,
            tp_group=None,
            pp_group=None,
            dp_group=None,
            mp_group=None,
            embedding_group=None,
            tp_ranks=[0],
            pp_ranks=[0],
            dp_ranks=[0],
            embedding_ranks=[0],
        )


def _expert_fields(world: int, rank: int, pp: int, ep: int, etp: int, mine: dict) -> dict:
    """ParallelState's expert (moe) fields for `rank`."""
    _, edp_rank, ep_rank, etp_rank = (
        int(i) for i in (expert_grid(world, pp, ep, etp) == rank).nonzero()[0]
    )
    out = {"ep_rank": ep_rank, "etp_rank": etp_rank, "edp_rank": edp_rank}
    for kind in ("ep", "etp", "edp"):
        ranks, group = mine[kind]
        out.update({f"{kind}_size": len(ranks), f"{kind}_group": group, f"{kind}_ranks": ranks})
    return out


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'node[01-04,07],gpu2' -> 'node01'."""
    depth = 0
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    if "[" in nodelist:
        prefix, rest = nodelist.split("[", 1)
        return prefix + rest.rstrip("]").split(",")[0].split("-")[0]
    return nodelist


def launch_env() -> dict[str, str | int]:
    """rank, world size, local rank and rendezvous address from torchrun's or SLURM's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or a hand-made launch)
        return {
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
            "master_port": env.get("MASTER_PORT", "29500"),
        }
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun without torchrun
        return {
            "rank": int(env["SLURM_PROCID"]),
            "world_size": int(env["SLURM_NTASKS"]),
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
            "master_addr": env.get("MASTER_ADDR")
            or first_slurm_host(
                env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
            ),
            "master_port": env.get("MASTER_PORT", "29500"),
        }
    return {
        "rank": 0,
        "world_size": 1,
        "local_rank": 0,
        "master_addr": "127.0.0.1",
        "master_port": str(free_port()),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> dict:
    """Initialize the default process group from the launcher's environment (idempotent).

    Backend: NCCL when CUDA is present, else gloo, unless `backend` says otherwise. A collective that
    waits longer than `timeout_minutes` (a dead peer) raises instead of hanging.
    """
    info = launch_env()
    if not dist.is_initialized():
        backend = backend or default_backend()
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{info['master_addr']}:{info['master_port']}",
            rank=info["rank"],
            world_size=info["world_size"],
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return info
