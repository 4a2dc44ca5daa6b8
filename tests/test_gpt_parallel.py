"""The whole GPT at tp = 2 and 4 (with and without sequence parallelism) gives the loss and every
(gathered) gradient of tp = 1, for the GPT-2 and Llama flavours; recomputation changes no gradient;
each pipeline stage/chunk gets the right layers and parameters."""

import pytest
import torch
import torch.distributed as dist
from factory import NO_DROPOUT, tiny_config

from megatron_lite.config import Config
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.model import build_model_chunks
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tensor_parallel import full_from_shards, set_random_seed

VOCAB, SEQ, BATCH = 100, 8, 2
FLAVOURS = {
    "gpt2": dict(hidden_size=32, num_attention_heads=4),
    "llama": dict(
        hidden_size=64,
        num_attention_heads=8,
        position_embedding_type="rope",
        normalization="RMSNorm",
        swiglu=True,
        untie_embeddings_and_output_weights=True,
        add_bias_linear=False,
        group_query_attention=True,
        num_query_groups=4,
    ),
}


def make_cfg(flavour: str, tp: int = 1, sp: bool = False, pp: int = 1, **model) -> Config:
    kw = dict(seq_length=SEQ, **NO_DROPOUT, **FLAVOURS[flavour])
    kw.update(model)
    return tiny_config(make_vocab_size_divisible_by=32, **kw, tp=tp, pp=pp, sp=sp, seed=7)


def _batch(explicit_mask: bool):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    weights = torch.rand(BATCH, SEQ, generator=g)
    mask = None
    if explicit_mask:  # reset-attention-mask: two documents per sample, no attention across them
        doc = (torch.arange(SEQ) >= SEQ // 2).long()
        same_doc = doc[:, None] == doc[None, :]
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        mask = ~(same_doc & causal)[None, None].expand(BATCH, 1, SEQ, SEQ)
    return tokens[:, :-1], tokens[:, 1:], weights, mask


def loss_and_grads(cfg: Config, ps: ParallelState, explicit_mask: bool = False, seed_rng=False):
    """Per-token loss and every parameter's full gradient (gathered over tp) by name."""
    model = build_model_chunks(cfg, ps, cfg.padded_vocab_size(VOCAB))[0]
    if seed_rng:
        set_random_seed(11, ps.tp_rank)
    tokens, labels, weights, mask = _batch(explicit_mask)
    loss = model(tokens, None, mask, labels)
    (loss * weights).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        if ps.tp_size > 1 and p.sequence_parallel:  # what finalize_model_grads does
            dist.all_reduce(grad, group=ps.tp_group)
        if ps.tp_size > 1 and p.tensor_model_parallel:
            shards = [torch.empty_like(grad) for _ in range(ps.tp_size)]
            dist.all_gather(shards, grad, group=ps.tp_group)
            grad = full_from_shards(shards, p.partition_dim, p.partition_stride)
        grads[name] = grad
    return loss.detach(), grads


def _assert_same(got, want, what):
    loss, grads = got
    want_loss, want_grads = want
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5, msg=what)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=f"{what}: {name}"
        )


def _tp_matches_single_process() -> None:
    tp = dist.get_world_size()
    ps = ParallelState.build(tp=tp)
    single = ParallelState.single()
    for flavour, backend, mask in (("gpt2", "sdpa", False), ("llama", "fused", True)):
        want = loss_and_grads(make_cfg(flavour, attention_backend=backend), single, mask)
        for sp in (False, True):
            cfg = make_cfg(flavour, tp=tp, sp=sp, attention_backend=backend)
            _assert_same(loss_and_grads(cfg, ps, mask), want, f"{flavour} tp={tp} sp={sp}")


@pytest.mark.parametrize("tp", [2, 4])
def test_gpt_loss_and_grads_at_tp_match_tp1_both_flavours(tp):
    run_distributed(_tp_matches_single_process, tp, timeout=150)


def _recompute_matches_none() -> None:
    tp = dist.get_world_size()
    ps = ParallelState.build(tp=tp) if tp > 1 else ParallelState.single()
    for backend in ("unfused", "sdpa"):
        kw = dict(
            num_layers=4, hidden_dropout=0.1, attention_dropout=0.1, attention_backend=backend
        )
        want = loss_and_grads(make_cfg("gpt2", tp, sp=tp > 1, **kw), ps, seed_rng=True)
        for extra in (
            dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
            dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
            dict(recompute_granularity="selective"),
        ):
            cfg = make_cfg("gpt2", tp, sp=tp > 1, **kw, **extra)
            got = loss_and_grads(cfg, ps, seed_rng=True)
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, msg=str(extra))
            for name in got[1]:
                torch.testing.assert_close(
                    got[1][name], want[1][name], rtol=1e-6, atol=1e-8, msg=f"{extra} {name}"
                )
        # dropout is really on: a different seed gives a different loss
        other = loss_and_grads(make_cfg("gpt2", tp, sp=tp > 1, **kw), ps)
        assert not torch.equal(other[0], want[0])


@pytest.mark.parametrize("tp", [1, 2])
def test_recomputation_gives_identical_gradients_with_dropout(tp):
    run_distributed(_recompute_matches_none, tp, timeout=150)


def _fake_state(pp: int, pp_rank: int, vpp: int | None) -> ParallelState:
    ps = ParallelState.single()
    ps.pp_size, ps.pp_rank, ps.vpp_size = pp, pp_rank, vpp
    return ps


def test_pipeline_chunks_hold_the_right_layers_and_parameters():
    cfg = make_cfg("gpt2", num_layers=8)
    full = dict(build_model_chunks(cfg, ParallelState.single(), 128)[0].named_parameters())
    seen = {}
    for pp_rank in range(2):
        chunks = build_model_chunks(cfg, _fake_state(2, pp_rank, 2), 128)
        assert len(chunks) == 2
        for c, chunk in enumerate(chunks):
            want_layers = [str((c * 2 + pp_rank) * 2 + i) for i in range(2)]
            assert list(chunk.decoder.layers.keys()) == want_layers
            assert chunk.pre_process == (pp_rank == 0 and c == 0)
            assert chunk.post_process == (pp_rank == 1 and c == 1)
            for name, p in chunk.named_parameters():
                seen[(pp_rank, c, name)] = p
                if name == "output_layer.weight":  # tied: a copy of the embedding, shared
                    assert p.shared_embedding
                    assert torch.equal(p, full["embedding.word_embeddings.weight"])
                else:  # same name, same values as in the one-stage model
                    assert torch.equal(p, full[name]), name
    names = {n for (_, _, n) in seen}
    assert names - {"output_layer.weight"} == set(full)
    assert seen[(0, 0, "embedding.word_embeddings.weight")].shared_embedding
    assert not any(p.shared_embedding for n, p in full.items())


def _init_independent_of_tp() -> None:
    one = build_model_chunks(make_cfg("llama"), ParallelState.single(), 128)[0]
    one = dict(one.named_parameters())
    fc1 = one["decoder.layers.0.mlp.linear_fc1.weight"]
    assert fc1.partition_stride == 2 and fc1.partition_dim == 0
    for name, p in one.items():
        for tag in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            assert hasattr(p, tag), (name, tag)
        assert not p.shared_embedding and not p.sequence_parallel
    assert one["decoder.layers.0.input_layernorm.weight"].eq(1).all()
    assert not one["decoder.layers.1.self_attention.linear_qkv.weight"].eq(0).any()
    ps = ParallelState.build(tp=2)
    two = dict(build_model_chunks(make_cfg("llama", tp=2, sp=True), ps, 128)[0].named_parameters())
    assert two.keys() == one.keys()
    for name, p in one.items():
        param, shard = two[name], two[name].detach()
        assert param.sequence_parallel == ("norm" in name), name
        if param.tensor_model_parallel:
            shards = [torch.empty_like(shard) for _ in range(2)]
            dist.all_gather(shards, shard.contiguous(), group=ps.tp_group)
            shard = full_from_shards(shards, param.partition_dim, param.partition_stride)
        assert torch.equal(shard, p), name


def test_initialization_is_independent_of_tp_and_tags_are_set():
    run_distributed(_init_independent_of_tp, 2, timeout=60)
