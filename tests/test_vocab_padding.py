"""Padded vocabulary entries never count: default flags give the single-process loss in every layout.

`--vocab-size 512` with the NullTokenizer is 513 ids with eod; the default
`--make-vocab-size-divisible-by 128` pads that to 640 at tp 1, 768 at tp 2 and 1024 at tp 4. The
padded rows must be neither classes of the softmax nor a function of the padding at initialisation,
or each tp trains a different model (before the fix: iteration 1 loss 6.4849 at tp 1, 6.6667 at tp 2).
"""

import pytest
import torch
from factory import NO_DROPOUT, make_config, tiny_config
from launch_util import TINY_GPT, layout_flags, losses, run_pretrain

from megatron_lite.model import build_model_chunks
from megatron_lite.parallel_state import ParallelState

ITERS = 6
FLAGS = [*TINY_GPT, "--train-iters", str(ITERS)]
FLAGS[FLAGS.index("--vocab-size") + 1] = "512"  # 513 ids with eod; the default divisor 128


def test_default_divisor_pads_differently_per_tp():
    cfg = make_config(num_layers=1, hidden_size=64, num_attention_heads=4)
    padded = []
    for tp in (1, 2, 4):
        cfg.parallel.tensor_model_parallel_size = tp
        padded.append(cfg.padded_vocab_size(513))
    assert padded == [640, 768, 1024]  # the case the layouts below must agree on


def test_real_rows_do_not_depend_on_padding_and_padded_logits_are_minus_inf():
    cfg = tiny_config(num_layers=1, seq_length=8, max_position_embeddings=8, **NO_DROPOUT)
    small, large = (
        build_model_chunks(cfg, ParallelState.single(), padded, vocab_size=513)[0]
        for padded in (640, 1024)
    )
    a = small.embedding.word_embeddings.weight
    b = large.embedding.word_embeddings.weight
    assert torch.equal(a[:513], b[:513])
    assert not a[:513].eq(0).all()
    assert a[513:].eq(0).all() and b[513:].eq(0).all()
    tokens = torch.randint(0, 513, (2, 8))
    la, lb = small(tokens), large(tokens)  # logits [b, s, padded]
    torch.testing.assert_close(la[..., :513], lb[..., :513])
    assert torch.isneginf(la[..., 513:]).all() and torch.isneginf(lb[..., 513:]).all()
    loss_a, loss_b = small(tokens, labels=tokens), large(tokens, labels=tokens)
    torch.testing.assert_close(loss_a, loss_b)
    loss_a.mean().backward()
    assert a.grad[513:].eq(0).all()  # padding gets no gradient: it stays zero, and out of norms


@pytest.fixture(scope="module")
def tp1_losses():
    got = losses(run_pretrain(1, [*FLAGS, *layout_flags(1, 1)]).stdout)
    assert sorted(got) == list(range(1, ITERS + 1))
    return got


LAYOUTS = {
    "tp2": (2, layout_flags(2, 1)),
    "tp4": (4, layout_flags(4, 1)),
    "tp2pp2": (4, layout_flags(2, 2)),
    "tp2dp2-zero1-sp": (
        4,
        [*layout_flags(2, 1), "--use-distributed-optimizer", "--sequence-parallel"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_default_flags_match_single_process_losses(tp1_losses, name):
    nproc, layout = LAYOUTS[name]
    got = losses(run_pretrain(nproc, [*FLAGS, *layout]).stdout)
    assert sorted(got) == sorted(tp1_losses)
    for it, ref in tp1_losses.items():
        assert got[it] == pytest.approx(ref, rel=1e-5), (name, it, got[it], ref)


@pytest.mark.slow
def test_tp1_checkpoint_resumed_at_tp4_continues_the_tp1_losses(tp1_losses, tmp_path):
    """640 rows saved, 1024 loaded (zero-padded): the function, and so the losses, stay the same."""
    ckpt = ["--save", str(tmp_path), "--load", str(tmp_path)]
    half = ITERS // 2
    run_pretrain(1, [*FLAGS, *layout_flags(1, 1), *ckpt, "--exit-interval", str(half)])
    got = losses(run_pretrain(4, [*FLAGS, *layout_flags(4, 1), *ckpt]).stdout)
    assert sorted(got) == list(range(half + 1, ITERS + 1))
    for it in got:
        assert got[it] == pytest.approx(tp1_losses[it], rel=1e-5), (it, got[it], tp1_losses[it])
