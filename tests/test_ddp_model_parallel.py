"""DDP and the optimizer under tensor and pipeline parallelism match the unsplit model.

The toy of tests/ddp_util.py carries the parameter tags of docs/internals.md: tp-split weights,
tp-replicated biases (norm counted once), a `sequence_parallel` scale (gradient summed over tp) and,
with two stages, a tied `shared_embedding` (gradient summed over the embedding group, norm counted on
the first stage only). Clipping is active (the norms exceed --clip-grad), so the returned global norm
and the clipped update are both checked against the unsplit model's.
"""

from __future__ import annotations

import pytest

from megatron_lite.distributed.testing import run_distributed
from megatron_lite.parallel_state import ParallelState
from tests.test_ddp_optimizer import (
    CLIP,
    assert_matches_reference,
    build,
    make_cfg,
    reference,
    train_step,
)


def _model_parallel_checks(tp: int, pp: int, steps: int, micro: int):
    ps = ParallelState.build(tp, pp)
    ref, ref_norms, _ = reference(steps, ps.dp_size * micro)
    assert min(ref_norms) > CLIP  # clipping really happens
    for dist_opt, overlap, bucket in [(False, False, None), (True, True, 100)]:
        cfg = make_cfg(
            tp,
            pp,
            use_distributed_optimizer=dist_opt,
            overlap_grad_reduce=overlap,
            ddp_bucket_size=bucket,
        )
        model, opt = build(cfg, ps)
        norms = [train_step(model, opt, ps, step, micro)[1] for step in range(steps)]
        what = f"tp={tp} pp={pp} dp={ps.dp_size} dist_opt={dist_opt}"
        assert norms == pytest.approx(ref_norms, rel=1e-5), what
        assert_matches_reference(model, ps, ref, what=what)
    return ps.dp_size


def test_tp2_dp2_matches_unsplit_model_and_its_grad_norm():
    assert run_distributed(_model_parallel_checks, 4, 2, 1, 3, 2, timeout=120) == [2] * 4


def test_tp2_pp2_dp2_with_tied_embedding_matches_unsplit_model():
    assert run_distributed(_model_parallel_checks, 8, 2, 2, 3, 2, timeout=120) == [2] * 8
