"""The MoE layer's parts on one process: the router's options (pre-softmax, z-loss, seq_aux_loss,
capacity policies), padding to capacity, the grouped matmul, the shared expert, --moe-layer-freq."""

import dataclasses

import torch
from factory import NO_DROPOUT, tiny_config

from megatron_lite.config import Config
from megatron_lite.model import build_model_chunks
from megatron_lite.model.moe import aux_losses
from megatron_lite.model.moe.layer import MoELayer
from megatron_lite.model.moe.router import TopKRouter, keep_within_capacity, load_balancing_loss
from megatron_lite.parallel_state import ParallelState

SEQ, BATCH, VOCAB = 16, 2, 100


def _cfg(**moe) -> Config:
    model = dict(swiglu=True, add_bias_linear=False, ffn_hidden_size=64)
    return tiny_config(seq_length=SEQ, **NO_DROPOUT, **model, **{"num_experts": 4, **moe})


def _loss_and_grads(cfg: Config):
    model = build_model_chunks(cfg, ParallelState.single(), 128, vocab_size=VOCAB)[0]
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    aux_losses.set_aux_loss_scale(1.0)
    loss = model(tokens[:, :-1], None, None, tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b, rtol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=rtol, atol=1e-6, msg=n)


def test_grouped_matmul_and_padding_to_capacity_change_no_result():
    _assert_same(_loss_and_grads(_cfg(moe_grouped_gemm=True)), _loss_and_grads(_cfg()))
    capped = dict(moe_expert_capacity_factor=1.0, moe_aux_loss_coeff=0.01)
    padded = _loss_and_grads(_cfg(**capped, moe_pad_expert_input_to_capacity=True))
    _assert_same(padded, _loss_and_grads(_cfg(**capped)))


def test_grouped_matmul_runs_torchs_kernel_when_it_fits(monkeypatch):
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    _loss_and_grads(_cfg(moe_grouped_gemm=True))
    assert len(calls) == 2 * 2  # fc1 and fc2 of both layers


def _router(**moe) -> TopKRouter:
    r = TopKRouter(_cfg(**moe), layer_number=0)
    torch.nn.init.normal_(r.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    return r


def test_router_probabilities_softmax_over_topk_or_topk_of_softmax():
    x = torch.randn(SEQ * BATCH, 32, generator=torch.Generator().manual_seed(2))
    probs, rmap = _router().eval()(x)
    assert rmap.sum(1).eq(2).all() and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(len(x)))
    pre, pre_map = _router(moe_router_pre_softmax=True).eval()(x)
    assert torch.equal(pre_map, rmap)
    full = torch.softmax(x @ _router().weight.t(), -1)
    torch.testing.assert_close(pre, full * rmap)  # the top-k entries of the full softmax


def test_z_loss_and_sequence_aux_loss_values_and_gradients():
    x = torch.randn(SEQ * BATCH, 32, generator=torch.Generator().manual_seed(3))
    aux_losses.reset()
    r = _router(moe_z_loss_coeff=1e-2, moe_router_load_balancing_type="seq_aux_loss",
                moe_aux_loss_coeff=1e-2)  # fmt: skip
    probs, _ = r.train()(x)
    logits = x @ r.weight.t()
    z = torch.logsumexp(logits, -1).square().mean()
    scores = torch.softmax(logits, -1).view(SEQ, BATCH, 4)
    per_seq = [load_balancing_loss(scores[:, b], 2) for b in range(BATCH)]
    tracked = aux_losses._tracked
    torch.testing.assert_close(tracked["z_loss"][0], z.detach())
    torch.testing.assert_close(tracked["seq_load_balancing_loss"][0], torch.stack(per_seq).mean())
    aux_losses.set_aux_loss_scale(1.0)
    (probs.sum() * 0).backward()  # only the aux losses reach the router's weight
    want = torch.autograd.grad(1e-2 * z + 1e-2 * torch.stack(per_seq).mean(), r.weight)[0]
    torch.testing.assert_close(r.weight.grad, want)


def test_capacity_keeps_most_probable_or_earliest_tokens():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    rmap = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=torch.bool)
    by_probs = keep_within_capacity(probs, rmap, 2, "probs")
    assert by_probs[:, 0].tolist() == [True, False, True, False] and by_probs[3, 1]
    by_position = keep_within_capacity(probs, rmap, 2, "position")
    assert by_position[:, 0].tolist() == [True, True, False, False] and by_position[3, 1]


def test_shared_expert_and_layer_freq_pick_the_layers_and_modules():
    model = build_model_chunks(
        _cfg(moe_layer_freq="[0, 1]", moe_shared_expert_intermediate_size=48),
        ParallelState.single(),
        128,
    )[0]
    layers = model.decoder.layers
    assert not isinstance(layers["0"].mlp, MoELayer) and isinstance(layers["1"].mlp, MoELayer)
    names = dict(model.named_parameters())
    assert names["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"].shape == (96, 32)
    assert names["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"].shape == (32, 64)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names


def test_full_recompute_changes_no_gradient_and_records_aux_losses_once():
    def run(**model):
        cfg = _cfg(moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
        aux_losses.reset()
        out = _loss_and_grads(cfg)
        return out, {k: dict(v) for k, v in aux_losses._tracked.items()}

    plain, plain_aux = run()
    again, again_aux = run(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    )
    _assert_same(again, plain, rtol=1e-6)
    assert again_aux.keys() == {"load_balancing_loss", "z_loss"}
    for name, per_layer in plain_aux.items():
        torch.testing.assert_close(again_aux[name], per_layer)
