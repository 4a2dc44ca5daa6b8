"""A dense step (no MoE, no zero-bubble, no cp, no tp) calls none of the optional features' hooks:
each is patched with a counter around one `train_step`, and every counter must stay at zero."""

from __future__ import annotations

import contextlib
from unittest import mock

from moe_util import batches, build_run, make_cfg

from megatron_lite.model import moe, transformer
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tensor_parallel import layers, weight_grad_store
from megatron_lite.training import step, train_step

HOOKS = {
    "moe start_step": (step.moe, "start_step"),
    "moe step_aux_losses": (moe, "step_aux_losses"),
    "weight-grad apply_grads": (layers, "apply_grads"),
    "weight-grad deferring_store": (layers, "deferring_store"),
    "weight-grad store put": (weight_grad_store.WeightGradStore, "put"),
    "custom linear": (layers.LinearWithGradAccumulationAndAsyncCommunication, "apply"),
    "cp ring_attention": (transformer, "ring_attention"),
    "cp chunk positions": (transformer, "cp_chunk_positions"),
}


def test_dense_step_calls_no_optional_feature_hook():
    run = build_run(make_cfg(1, num_experts=None), ParallelState.single())
    with contextlib.ExitStack() as stack:
        mocks = {
            name: stack.enter_context(
                mock.patch.object(owner, attr, side_effect=getattr(owner, attr), autospec=False)
            )
            for name, (owner, attr) in HOOKS.items()
        }
        out = train_step(run, iter(batches(0, run.ps, run.cfg)))
    assert out["success"] and out["loss"] > 0
    called = {name: m.call_count for name, m in mocks.items() if m.call_count}
    assert called == {}, f"optional features ran in a dense step: {called}"


def test_zero_bubble_store_alive_routes_linears_through_the_deferring_path():
    """The counter above can fail: with a store alive the custom linear runs (what zero-bubble needs)."""
    run = build_run(make_cfg(1, num_experts=None), ParallelState.single())
    store = weight_grad_store.WeightGradStore()
    owner, attr = HOOKS["custom linear"]
    with mock.patch.object(owner, attr, side_effect=getattr(owner, attr)) as m:
        train_step(run, iter(batches(0, run.ps, run.cfg)))
    assert m.call_count > 0
    del store
