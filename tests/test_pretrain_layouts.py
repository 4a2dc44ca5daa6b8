"""The real entry point under torchrun: every tp x pp x dp layout reproduces the 1x1x1 losses.

fp32, same seed, same data, dropout off: per-iteration lm loss within 1e-5 relative over 10 iterations.
"""

import re

import pytest
from launch_util import TINY_GPT, layout_flags, losses, run_pretrain

ITERS = 10
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2)]
PARAMS_NORM_RE = re.compile(r" params norm: ([0-9.]+) \|")


@pytest.fixture(scope="module")
def reference_run():
    out = run_pretrain(
        1, [*TINY_GPT, "--train-iters", str(ITERS), *layout_flags(1, 1), "--log-params-norm"]
    )
    ref = losses(out.stdout)
    assert sorted(ref) == list(range(1, ITERS + 1)), out.stdout[-3000:]
    assert ref[ITERS] < ref[1]  # it learns
    return out.stdout


@pytest.fixture(scope="module")
def reference_losses(reference_run):
    return losses(reference_run)


def params_norms(output: str) -> list[float]:
    return [float(v) for v in PARAMS_NORM_RE.findall(output)]


@pytest.mark.parametrize(
    "tp,pp,dp",
    # make test-fast runs dp2 only: each layout is a torchrun launch of its own
    [pytest.param(*x, marks=[] if x == (1, 1, 2) else pytest.mark.slow) for x in LAYOUTS],
    ids=[f"tp{t}pp{p}dp{d}" for t, p, d in LAYOUTS],
)
def test_layout_matches_single_process_losses(reference_run, reference_losses, tp, pp, dp):
    """... and --log-params-norm's values: each parameter counted once, whatever the split."""
    flags = [*TINY_GPT, "--train-iters", str(ITERS), *layout_flags(tp, pp), "--log-params-norm"]
    out = run_pretrain(tp * pp * dp, flags)
    got = losses(out.stdout)
    assert sorted(got) == sorted(reference_losses), out.stdout[-3000:]
    for it, ref in reference_losses.items():
        assert got[it] == pytest.approx(ref, rel=1e-5), (it, got[it], ref)
    want = params_norms(reference_run)
    assert len(want) == ITERS and params_norms(out.stdout) == pytest.approx(want, abs=2e-3)


@pytest.mark.slow
def test_virtual_pipeline_and_zero_bubble_match_single_process(reference_losses):
    for extra in (
        ["--num-layers-per-virtual-pipeline-stage", "1"],
        ["--pipeline-schedule", "zero-bubble"],
    ):
        out = run_pretrain(2, [*TINY_GPT, "--train-iters", str(ITERS), *layout_flags(1, 2), *extra])
        got = losses(out.stdout)
        for it, ref in reference_losses.items():
            assert got[it] == pytest.approx(ref, rel=1e-5), (extra, it, got[it], ref)


@pytest.mark.slow
def test_distributed_optimizer_and_sequence_parallel_match_single_process(
    reference_run, reference_losses, tmp_path
):
    """tp2 x dp2, ZeRO-1 with both overlaps and sequence parallelism; saved half-way (parameter
    all-gathers still in flight land first) and resumed."""
    flags = [
        *TINY_GPT,
        "--train-iters",
        str(ITERS),
        *layout_flags(2, 1),
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
        "--sequence-parallel",
        "--log-params-norm",
    ]
    half = ITERS // 2
    ckpt = ["--save", str(tmp_path), "--load", str(tmp_path)]
    first = run_pretrain(4, [*flags, *ckpt, "--exit-interval", str(half)]).stdout
    second = run_pretrain(4, [*flags, *ckpt]).stdout
    got = {**losses(first), **losses(second)}
    assert sorted(got) == sorted(reference_losses)
    norms = params_norms(first) + params_norms(second)  # ZeRO-1: each rank's shard counted once
    assert norms == pytest.approx(params_norms(reference_run), abs=2e-3)
    for it, ref in reference_losses.items():
        assert got[it] == pytest.approx(ref, rel=1e-5), (it, got[it], ref)


@pytest.mark.slow
def test_batch_size_rampup_is_exact_across_dp():
    """Megatron's GPT-3 recipe in small: --train-samples 40 --rampup-batch-size 4 4 16 and the LR
    warm-up in samples: global batch 4 for the first 16 samples, then 8, in any layout."""
    flags = " ".join(TINY_GPT).replace("--lr-warmup-iters 2", "--lr-warmup-samples 12").split()
    flags += ["--train-samples", "40", "--rampup-batch-size", "4", "4", "16"]
    one = run_pretrain(1, flags)
    two = run_pretrain(2, flags)
    sizes = [int(m) for m in re.findall(r"global batch size:\s+(\d+) \|", one.stdout)]
    assert sizes == [4, 4, 4, 4, 8, 8, 8]  # 16 samples at 4, then 8: 40 samples in 7 iterations
    lrs = [float(m) for m in re.findall(r"learning rate: ([0-9.E+-]+) \|", one.stdout)]
    assert lrs[:3] == pytest.approx([1e-3 * n / 12 for n in (4, 8, 12)], rel=1e-5)  # by samples
    got, ref = losses(two.stdout), losses(one.stdout)
    assert sorted(got) == sorted(ref) == list(range(1, 8))
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-5), (it, got[it], ref[it])
