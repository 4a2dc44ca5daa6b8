"""A dense step (no MoE, no zero-bubble, no cp, no tp, no DPO) calls none of the optional features' hooks:
each is patched with a counter around one `train_step`, and every counter must stay at zero."""

from __future__ import annotations

import contextlib
import inspect
from unittest import mock

from moe_util import batches, build_run, make_cfg

from megatron_lite.model import context_parallel, moe, transformer
from megatron_lite.model.moe import aux_losses, router
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
    # the rest of each feature's per-step code: MoE layers and their loss records, the zero-bubble
    # store's deferral, cp's batch slicing and ring, DPO's pair handling
    "moe layer forward": (moe.MoELayer, "forward"),
    "moe router forward": (router.TopKRouter, "forward"),
    "moe aux record": (aux_losses, "record"),
    "moe aux reset": (aux_losses, "reset"),
    "moe aux attach": (aux_losses, "attach"),
    "weight-grad store defer": (weight_grad_store.WeightGradStore, "defer"),
    "weight-grad store pop": (weight_grad_store.WeightGradStore, "pop"),
    "weight-grad store pop_all": (weight_grad_store.WeightGradStore, "pop_all"),
    "cp batch slicer": (context_parallel.CPBatchSlicer, "__iter__"),
    "cp slice": (context_parallel, "slice_for_cp"),
    "cp ring autograd": (context_parallel.RingAttention, "apply"),
    "dpo flatten pairs": (step, "flatten_pairs"),
    "dpo loss": (step, "dpo_loss_func"),
}


def _method(owner, attr) -> bool:
    """A plain method of a class: its counter must stay a method (autospec binds `self`)."""
    return isinstance(owner, type) and inspect.isfunction(inspect.getattr_static(owner, attr))


def _hooks_called(run) -> dict[str, int]:
    """One `train_step` with every hook of HOOKS counted: {hook: calls} for those called."""
    with contextlib.ExitStack() as stack:
        mocks = {
            name: stack.enter_context(
                mock.patch.object(
                    owner, attr, side_effect=getattr(owner, attr), autospec=_method(owner, attr)
                )
            )
            for name, (owner, attr) in HOOKS.items()
        }
        out = train_step(run, iter(batches(0, run.ps, run.cfg)))
    assert out["success"] and out["loss"] > 0
    return {name: m.call_count for name, m in mocks.items() if m.call_count}


def test_dense_step_calls_no_optional_feature_hook():
    called = _hooks_called(build_run(make_cfg(1, num_experts=None), ParallelState.single()))
    assert called == {}, f"optional features ran in a dense step: {called}"


def test_moe_step_trips_the_moe_counters():
    """The counters can fail: an MoE step calls every MoE hook (and no zero-bubble, cp or DPO one)."""
    called = _hooks_called(build_run(make_cfg(1), ParallelState.single()))
    moe_hooks = {name for name in HOOKS if name.startswith("moe")}
    assert set(called) == moe_hooks, (
        f"MoE step called {sorted(called)}, expected {sorted(moe_hooks)}"
    )


def test_zero_bubble_store_alive_routes_linears_through_the_deferring_path():
    """The counter above can fail: with a store alive the custom linear runs (what zero-bubble needs)."""
    run = build_run(make_cfg(1, num_experts=None), ParallelState.single())
    store = weight_grad_store.WeightGradStore()
    owner, attr = HOOKS["custom linear"]
    with mock.patch.object(owner, attr, side_effect=getattr(owner, attr)) as m:
        train_step(run, iter(batches(0, run.ps, run.cfg)))
    assert m.call_count > 0
    del store
