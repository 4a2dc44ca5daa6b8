"""Zero-bubble weight-gradient deferral: same gradients, hooks fire, one microbatch per pop()."""

import pytest
import torch
from factory import NO_DROPOUT, tiny_config

from megatron_lite.model import build_model_chunks
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tensor_parallel import ColumnParallelLinear, RowParallelLinear, WeightGradStore


def _tiny_gpt(**model):
    cfg = tiny_config(seq_length=8, **NO_DROPOUT, **model)
    return build_model_chunks(cfg, ParallelState.single(), cfg.padded_vocab_size(50))[0]


def test_deferred_weight_grads_equal_immediate_ones_and_fire_hooks():
    ref, model = _tiny_gpt(), _tiny_gpt()
    tokens = [torch.randint(0, 50, (2, 8)) for _ in range(2)]
    for t in tokens:
        ref(t, labels=t).mean().backward()

    store = WeightGradStore()
    fired = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: fired.append(name))
    for t in tokens:
        with store.defer():
            model(t, labels=t).mean().backward()
    assert store.num_pending() == 2
    params = dict(model.named_parameters())
    linear_weights = [n for n in params if "linear" in n and n.endswith("weight")]
    assert not any(n in fired for n in linear_weights), "weight grads ran before pop()"
    # input-gradient path complete: embedding and norms already have their grads
    assert model.embedding.word_embeddings.weight.grad is not None

    store.pop()
    assert store.num_pending() == 1
    store.pop()
    assert store.num_pending() == 0
    with pytest.raises(RuntimeError, match="no deferred microbatch"):
        store.pop()
    assert all(n in fired for n in linear_weights)
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-6, atol=1e-7, msg=name)


def test_pop_runs_the_oldest_microbatch_first():
    lin = ColumnParallelLinear(4, 6, tp_group=None)
    row = RowParallelLinear(6, 4, tp_group=None)
    for p in (*lin.parameters(), *row.parameters()):
        torch.nn.init.normal_(p)
    xs = [torch.randn(3, 2, 4, requires_grad=True) for _ in range(2)]
    store = WeightGradStore()
    for x in xs:
        with store.defer():
            row(lin(x)[0])[0].sum().backward()
        assert x.grad is not None  # input gradient computed immediately
    assert lin.weight.grad is None
    store.pop()
    first = lin.weight.grad.clone()
    want = torch.ones(3, 2, 4) @ row.weight  # d/d(lin out) of sum(row(.))
    torch.testing.assert_close(first, want.reshape(-1, 6).t() @ xs[0].detach().reshape(-1, 4))
    store.pop()
    assert not torch.equal(first, lin.weight.grad)
