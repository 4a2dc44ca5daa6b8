"""The distributed test harness reports a failing or hanging rank instead of hanging itself."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron_lite.distributed.testing import DistributedError, run_distributed


def _sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _rank_one_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # the other ranks wait for a peer that will never come


def _rank_zero_hangs():
    if dist.get_rank() == 0:
        while True:
            time.sleep(0.05)


def test_results_come_back_in_rank_order():
    assert run_distributed(_sum_of_ranks, 3) == [3.0, 3.0, 3.0]


def test_a_raising_rank_fails_fast_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(DistributedError, match="boom on rank one") as e:
        run_distributed(_rank_one_raises, 2, timeout=60)
    assert "rank 1" in str(e.value) and "ValueError" in str(e.value)
    assert time.monotonic() - start < 30  # not the 60 s collective timeout


def test_a_hanging_rank_fails_after_the_timeout():
    with pytest.raises(DistributedError, match="did not finish"):
        run_distributed(_rank_zero_hangs, 2, timeout=2)


def _return_a_tensor():
    return torch.full((3,), float(dist.get_rank()))


def test_ranks_can_return_tensors():
    out = run_distributed(_return_a_tensor, 2)
    assert [t.tolist() for t in out] == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
