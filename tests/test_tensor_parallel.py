"""Each tensor-parallel layer equals its unsplit torch counterpart on 1, 2 and 4 gloo ranks (output and
input/weight gradients, fp32), the RNG tracker gives tp regions per-rank streams, and one transformer
layer issues exactly Megatron's collectives."""

from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from factory import tiny_config

from megatron_lite.distributed.testing import run_distributed
from megatron_lite.model.transformer import TransformerLayer
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_from_shards,
    get_rng_tracker,
    mappings,
    set_random_seed,
    shard_of,
    token_log_probs,
    vocab_parallel_cross_entropy,
)

TOL = dict(rtol=1e-5, atol=1e-6)


def _gather(shard: torch.Tensor, dim: int, group, stride: int = 1) -> torch.Tensor:
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, shard.contiguous(), group=group)
    return full_from_shards(shards, dim, stride)


def _same_everywhere(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check_column(ps: ParallelState, sp: bool, gather_output: bool, stride: int) -> None:
    g, tp, r = ps.tp_group, ps.tp_size, ps.tp_rank
    s, b, k, n = 8, 3, 6, 8
    w_full, b_full = _same_everywhere(1, n, k), _same_everywhere(2, n)
    x_full = _same_everywhere(3, s, b, k).requires_grad_()
    dy_full = _same_everywhere(4, s, b, n)
    y_ref = F.linear(x_full, w_full.requires_grad_(), b_full.requires_grad_())
    y_ref.backward(dy_full)

    lin = ColumnParallelLinear(
        k, n, tp_group=g, gather_output=gather_output, sequence_parallel=sp, stride=stride
    )
    assert lin.weight.tensor_model_parallel and lin.weight.partition_dim == 0
    assert lin.weight.partition_stride == stride and lin.bias.partition_dim == 0
    with torch.no_grad():
        lin.weight.copy_(shard_of(w_full, 0, stride, r, tp))
        lin.bias.copy_(shard_of(b_full, 0, stride, r, tp))
    x = (mappings.split_dim(x_full.detach(), 0, g) if sp else x_full.detach()).requires_grad_()
    y, _ = lin(x)
    want = y_ref.detach() if gather_output else shard_of(y_ref.detach(), 2, stride, r, tp)
    torch.testing.assert_close(y, want, **TOL)
    y.backward(dy_full if gather_output else shard_of(dy_full, 2, stride, r, tp))
    want_dx = mappings.split_dim(x_full.grad, 0, g) if sp else x_full.grad
    torch.testing.assert_close(x.grad, want_dx, **TOL)
    torch.testing.assert_close(_gather(lin.weight.grad, 0, g, stride), w_full.grad, **TOL)
    torch.testing.assert_close(_gather(lin.bias.grad, 0, g, stride), b_full.grad, **TOL)


def _check_row(ps: ParallelState, sp: bool, input_is_parallel: bool) -> None:
    g, tp, r = ps.tp_group, ps.tp_size, ps.tp_rank
    s, b, k, n = 8, 3, 8, 5
    w_full, b_full = _same_everywhere(5, n, k), _same_everywhere(6, n)
    x_full = _same_everywhere(7, s, b, k).requires_grad_()
    dy_full = _same_everywhere(8, s, b, n)
    y_ref = F.linear(x_full, w_full.requires_grad_(), b_full.requires_grad_())
    y_ref.backward(dy_full)

    lin = RowParallelLinear(
        k, n, tp_group=g, input_is_parallel=input_is_parallel, sequence_parallel=sp
    )
    assert lin.weight.partition_dim == 1 and not lin.bias.tensor_model_parallel
    assert lin.bias.sequence_parallel == (sp and tp > 1)
    with torch.no_grad():
        lin.weight.copy_(shard_of(w_full, 1, 1, r, tp))
        lin.bias.copy_(b_full)
    x_in = shard_of(x_full.detach(), 2, 1, r, tp) if input_is_parallel else x_full.detach()
    x = x_in.clone().requires_grad_()
    y, _ = lin(x)
    torch.testing.assert_close(y, mappings.split_dim(y_ref.detach(), 0, g) if sp else y_ref, **TOL)
    y.backward(mappings.split_dim(dy_full, 0, g) if sp else dy_full)
    want_dx = shard_of(x_full.grad, 2, 1, r, tp) if input_is_parallel else x_full.grad
    torch.testing.assert_close(x.grad, want_dx, **TOL)
    torch.testing.assert_close(_gather(lin.weight.grad, 1, g), w_full.grad, **TOL)
    bias_grad = lin.bias.grad.clone()
    if lin.bias.sequence_parallel:  # partial over sequence shards: finalize_model_grads sums it
        dist.all_reduce(bias_grad, group=g)
    torch.testing.assert_close(bias_grad, b_full.grad, **TOL)


def _check_embedding_and_cross_entropy(ps: ParallelState, reduce_scatter: bool) -> None:
    g, tp, r = ps.tp_group, ps.tp_size, ps.tp_rank
    v, h, b, s = 16, 4, 2, 8
    w_full = _same_everywhere(9, v, h).requires_grad_()
    ids = torch.randint(0, v, (b, s), generator=torch.Generator().manual_seed(10))
    dy = _same_everywhere(11, b, s, h)
    F.embedding(ids, w_full).backward(dy)
    emb = VocabParallelEmbedding(v, h, tp_group=g, reduce_scatter_embeddings=reduce_scatter)
    with torch.no_grad():
        emb.weight.copy_(shard_of(w_full.detach(), 0, 1, r, tp))
    y = emb(ids)
    want = F.embedding(ids, w_full.detach())
    if emb.reduce_scatter_embeddings:
        want, dy = (mappings.split_dim(t.transpose(0, 1), 0, g) for t in (want, dy))
    torch.testing.assert_close(y, want, **TOL)
    y.backward(dy)
    torch.testing.assert_close(_gather(emb.weight.grad, 0, g), w_full.grad, **TOL)

    logits_full = (_same_everywhere(12, s, b, v) * 3).requires_grad_()
    target = torch.randint(0, v, (s, b), generator=torch.Generator().manual_seed(13))
    dl = _same_everywhere(14, s, b)
    want_loss = F.cross_entropy(logits_full.reshape(-1, v), target.reshape(-1), reduction="none")
    want_loss.reshape(s, b).backward(dl)
    logits = shard_of(logits_full.detach(), 2, 1, r, tp).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits.clone(), target, g)
    torch.testing.assert_close(loss, want_loss.detach().reshape(s, b), **TOL)
    loss.backward(dl)
    torch.testing.assert_close(logits.grad, shard_of(logits_full.grad, 2, 1, r, tp), **TOL)
    # the same softmax as log-probabilities (evaluation's, the DPO reference's): logits untouched
    shard = logits.detach().clone()
    logp = token_log_probs(shard, target, g)
    want_logp = logits_full.detach().log_softmax(-1).gather(-1, target[..., None])[..., 0]
    torch.testing.assert_close(logp, want_logp, rtol=0, atol=1e-6)
    assert torch.equal(shard, logits.detach())


def _check_mappings(ps: ParallelState) -> None:
    g, tp, r = ps.tp_group, ps.tp_size, ps.tp_rank
    x = torch.full((tp * 2, 3), float(r + 1), requires_grad=True)
    y = mappings.reduce_from_tensor_model_parallel_region(x * 1.0, g)
    assert torch.all(y == tp * (tp + 1) / 2)
    y = mappings.gather_from_sequence_parallel_region(x, g)
    assert y.shape == (tp * tp * 2, 3) and y[-1, 0] == tp
    y.backward(torch.ones_like(y))  # reduce-scatter: every rank contributed ones
    assert torch.all(x.grad == tp)
    y = mappings.gather_from_tensor_model_parallel_region(x.detach(), g)
    assert y.shape == (tp * 2, 3 * tp) and y[0, -1] == tp
    assert torch.equal(mappings.scatter_to_tensor_model_parallel_region(y, g), x.detach())


def _check_rng_tracker(ps: ParallelState) -> None:
    set_random_seed(1234, ps.tp_rank)
    shared = torch.rand(4)
    with get_rng_tracker().fork():
        own = torch.rand(4)
    after = torch.rand(4)
    everyone = _gather(torch.stack([shared, own, after]).unsqueeze(0), 0, ps.tp_group)
    for i in range(ps.tp_size):
        assert torch.equal(everyone[i, 0], everyone[0, 0])  # replicated region: same stream
        assert torch.equal(everyone[i, 2], everyone[0, 2])  # the fork left the default stream alone
        for j in range(i):
            assert not torch.equal(everyone[i, 1], everyone[j, 1])  # tp region: per-rank stream
    states = get_rng_tracker().get_states()
    with get_rng_tracker().fork():
        a = torch.rand(3)
    get_rng_tracker().set_states(states)
    with get_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a)


class _CountCollectives:
    """Counts the collectives torch.distributed runs inside the block."""

    KINDS = {
        "all_reduce": "all_reduce",
        "all_gather": "all_gather",
        "all_gather_into_tensor": "all_gather",
        "all_gather_single": "all_gather",
        "reduce_scatter_tensor": "reduce_scatter",
        "reduce_scatter_single": "reduce_scatter",
    }

    def __enter__(self):
        self.counts, self._saved = Counter(), {}
        for name, kind in self.KINDS.items():
            real = getattr(dist, name, None)
            if real is None:
                continue
            self._saved[name] = real

            def counted(*a, _real=real, _kind=kind, **k):
                self.counts[_kind] += 1
                return _real(*a, **k)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(dist, name, real)


def _check_collectives_per_layer(ps: ParallelState, sp: bool) -> None:
    tp = ps.tp_size
    model = dict(num_layers=1, hidden_size=16, seq_length=8, hidden_dropout=0.0)
    cfg = tiny_config(**model, tp=tp, sp=sp)
    layer = TransformerLayer(cfg, ps.tp_group)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(8 // tp if sp else 8, 2, 16, requires_grad=True)
    with _CountCollectives() as fwd:
        y = layer(x)
    with _CountCollectives() as bwd:
        y.sum().backward()
    if sp:
        want = {"all_gather": 2, "reduce_scatter": 2}
    else:
        want = {"all_reduce": 2}
    assert dict(fwd.counts) == want, (sp, fwd.counts)
    assert dict(bwd.counts) == want, (sp, bwd.counts)


def _all_layer_checks() -> int:
    tp = dist.get_world_size()
    ps = ParallelState.build(tp=tp)
    _check_mappings(ps)
    for sp in (False, True):
        for gather_output, stride in ((False, 1), (True, 1), (False, 2)):
            if not (sp and gather_output):
                _check_column(ps, sp, gather_output, stride)
        for input_is_parallel in (True, False):
            if not (sp and not input_is_parallel):
                _check_row(ps, sp, input_is_parallel)
        _check_embedding_and_cross_entropy(ps, reduce_scatter=sp)
    _check_rng_tracker(ps)
    if tp > 1:
        _check_collectives_per_layer(ps, sp=False)
        _check_collectives_per_layer(ps, sp=True)
    return tp


def test_token_log_probs_are_log_softmax_and_the_negated_cross_entropy():
    """One process, no group: training's loss (logits lent, `inplace`) is exactly minus the
    log-probability of the vocab-parallel function; not lent, the logits stay as they were and
    the values are log_softmax's; bf16 logits are scored in fp32."""
    logits = _same_everywhere(21, 3, 5, 40) * 4
    target = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(22))
    kept = logits.clone()
    logp = token_log_probs(kept, target)
    assert torch.equal(kept, logits)
    want = logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]
    torch.testing.assert_close(logp, want, rtol=0, atol=1e-6)
    lent = logits.clone()
    train = token_log_probs(lent, target, inplace=True)
    assert torch.equal(-train, vocab_parallel_cross_entropy(logits.clone(), target, None))
    assert not torch.equal(lent, logits)  # its memory held the softmax
    torch.testing.assert_close(train, logp, rtol=0, atol=1e-6)
    half = token_log_probs(logits.bfloat16(), target)
    want = logits.bfloat16().float().log_softmax(-1).gather(-1, target[..., None])[..., 0]
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_layers_match_unsplit_torch_layers(tp):
    assert run_distributed(_all_layer_checks, tp, timeout=120) == [tp] * tp


def test_shards_round_trip_with_stride():
    full = torch.arange(24.0).reshape(8, 3)
    for tp in (1, 2, 4):
        for stride in (1, 2):
            shards = [shard_of(full, 0, stride, r, tp) for r in range(tp)]
            assert torch.equal(full_from_shards(shards, 0, stride), full)
    # stride 2 over 2 ranks: rank 0 holds rows 0-1 and 4-5 ([gate; up] halves)
    assert shard_of(full, 0, 2, 0, 2)[:, 0].tolist() == [0, 3, 12, 15]
