"""RNG states of every rank (tp ranks differ in the tracker, dp ranks may differ too)."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from megatron_lite import comm, device
from megatron_lite.checkpointing.files import plain
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tensor_parallel.random import get_rng_tracker


def get_rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "random": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(gauss)],
        **device.rng_state(),
    }
    state["tp_tracker"] = get_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["random"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    device.set_rng_state(state)
    if "tp_tracker" in state:
        get_rng_tracker().set_states(state["tp_tracker"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def gather_rng_states(ps: ParallelState) -> list[dict] | None:
    """Every dp rank's RNG state, in dp-rank order, on dp rank 0 (None elsewhere).

    States travel as torch.save bytes (read back with weights_only=True), not as pickled objects.
    """
    state = plain(get_rng_state(), "rng_state")
    if ps.dp_size == 1 or ps.dp_group is None:
        return [state]
    buf = io.BytesIO()
    torch.save(state, buf)
    dev = device.comm_device(ps.backend)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(ps.dp_size)]
    comm.all_gather_list(sizes, torch.tensor([data.numel()], device=dev), ps.dp_group)
    longest = int(max(sizes).item())
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: data.numel()] = data.to(dev)
    blobs = [torch.empty_like(padded) for _ in range(ps.dp_size)]
    comm.all_gather_list(blobs, padded, ps.dp_group)  # a few KiB per rank
    if ps.dp_rank != 0:
        return None
    return [
        torch.load(io.BytesIO(b[: int(n.item())].cpu().numpy().tobytes()), weights_only=True)
        for b, n in zip(blobs, sizes)
    ]
