"""MegatronPretrainingSampler: dp shards cover each step exactly; a resumed run (any dp size) sees
exactly the samples an uninterrupted run would."""

import pytest
import torch

from megatron_lite.data.sampler import MegatronPretrainingSampler, build_pretraining_data_loader


def global_steps(total, consumed, mbs, dp):
    """Per step, the samples of all dp ranks in rank order."""
    per_rank = [list(MegatronPretrainingSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
    return [sum((per_rank[r][s] for r in range(dp)), []) for s in range(len(per_rank[0]))]


def test_ranks_get_disjoint_consecutive_slices():
    s0 = list(MegatronPretrainingSampler(20, 0, 2, 0, 3))
    s1 = list(MegatronPretrainingSampler(20, 0, 2, 1, 3))
    assert s0[:2] == [[0, 1], [6, 7]] and s1[:2] == [[2, 3], [8, 9]]
    assert len(s0) == 3  # 20 // 6 full steps; the partial last step is dropped


@pytest.mark.parametrize("dp_before,dp_after", [(2, 2), (2, 4), (4, 1), (1, 3)])
def test_resume_is_exact_across_dp_sizes(dp_before, dp_after):
    total, mbs, gbs = 240, 2, 12  # a global batch of 12 = mbs x dp x microbatches
    full = [i for step in global_steps(total, 0, mbs, dp_before) for i in step]
    stop = 5 * gbs  # consumed_samples saved in the checkpoint after 5 iterations
    resumed = [i for step in global_steps(total, stop, mbs, dp_after) for i in step]
    assert full == list(range(total))
    assert resumed == full[stop : stop + len(resumed)]
    assert total - stop - len(resumed) < mbs * dp_after  # only a partial last step is dropped


def test_data_loader_yields_this_ranks_microbatches():
    data = [{"tokens": torch.full((4,), i), "labels": torch.full((4,), -i)} for i in range(16)]
    loader = build_pretraining_data_loader(data, 4, 2, 1, 2)
    batches = list(loader)
    assert [b["tokens"][:, 0].tolist() for b in batches] == [[6, 7], [10, 11], [14, 15]]
    assert batches[0]["labels"].shape == (2, 4)
    assert build_pretraining_data_loader(None, 0, 1, 0, 1) is None


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="consumed_samples \\(10\\) must be less than"):
        MegatronPretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError, match="dp_rank < dp_size \\(2\\)"):
        MegatronPretrainingSampler(10, 0, 1, 2, 2)
