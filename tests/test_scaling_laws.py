"""megatron_lite/estimate/scaling_laws.py and tools/scaling_laws.py: the Hoffmann et al. approach-3
fit recovers known parameters, the frontier is the minimum at fixed compute, the tool reads log lines
and TensorBoard files and hands a plan to tools/estimate.py, and on a real tiny CPU sweep
(examples/scaling_sweep.sh) the law predicts a held-out model size within 2%."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.estimate.scaling_laws import ScalingLaw, best_shape, fit, objective
from megatron_lite.training.log import format_log_line

ROOT = Path(__file__).resolve().parents[1]
CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # the paper's fit
SWEEP_N = np.repeat(np.logspace(7, 10, 6), 5)
SWEEP_D = np.tile(np.logspace(9, 12, 5), 6)


def test_fit_recovers_known_parameters_from_noiseless_losses():
    law, value = fit(SWEEP_N, SWEEP_D, CHINCHILLA.loss(SWEEP_N, SWEEP_D))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(CHINCHILLA, name), rel=1e-4), name
    assert value < 1e-12


def test_fit_recovers_known_parameters_from_noisy_losses():
    rng = np.random.default_rng(0)
    loss = CHINCHILLA.loss(SWEEP_N, SWEEP_D) * np.exp(rng.normal(0, 1e-3, SWEEP_N.shape))
    law, _ = fit(SWEEP_N, SWEEP_D, loss)
    assert law.E == pytest.approx(CHINCHILLA.E, rel=0.01)
    assert law.alpha == pytest.approx(CHINCHILLA.alpha, abs=0.01)
    assert law.beta == pytest.approx(CHINCHILLA.beta, abs=0.01)
    assert law.A == pytest.approx(CHINCHILLA.A, rel=0.1)
    assert law.B == pytest.approx(CHINCHILLA.B, rel=0.1)
    n, d = CHINCHILLA.compute_optimal(1e23)
    assert law.compute_optimal(1e23)[0] == pytest.approx(n, rel=0.05)
    assert law.compute_optimal(1e23)[1] == pytest.approx(d, rel=0.05)


def test_objective_gradient_matches_finite_differences():
    log_n, log_d = np.log(SWEEP_N), np.log(SWEEP_D)
    log_l = np.log(CHINCHILLA.loss(SWEEP_N, SWEEP_D)) + 0.01  # off the optimum: a gradient
    theta = np.array([6.0, 6.1, 0.5, 0.35, 0.3])
    _, grad = objective(theta, log_n, log_d, log_l, 1e-3)
    for i in range(5):
        step = np.zeros(5)
        step[i] = 1e-6
        hi, _ = objective(theta + step, log_n, log_d, log_l, 1e-3)
        lo, _ = objective(theta - step, log_n, log_d, log_l, 1e-3)
        assert grad[i] == pytest.approx((hi - lo) / 2e-6, rel=1e-4, abs=1e-9), i


def test_compute_optimal_point_is_the_minimum_loss_at_fixed_compute():
    for flops in (1e18, 5.76e23):
        n_opt, d_opt = CHINCHILLA.compute_optimal(flops)
        assert 6 * n_opt * d_opt == pytest.approx(flops)
        n = np.logspace(np.log10(n_opt) - 1, np.log10(n_opt) + 1, 20001)
        assert n[np.argmin(CHINCHILLA.loss(n, flops / (6 * n)))] == pytest.approx(n_opt, rel=1e-3)


def test_best_shape_spends_the_budget_on_the_lowest_predicted_loss():
    shapes = [{"n": n} for n in np.logspace(8, 12, 41)]
    shape, n, d, pred = best_shape(CHINCHILLA, 1e23, shapes, lambda s: s["n"], lambda s: 6 * s["n"])
    n_opt, _ = CHINCHILLA.compute_optimal(1e23)
    assert abs(np.log10(n) - np.log10(n_opt)) <= 0.05 + 1e-9  # the grid's spacing, half
    assert pred == pytest.approx(float(CHINCHILLA.loss(n, 1e23 / (6 * n))))


# ---------------------------------------------------------------- the tool, on written runs

TINY = "--num-layers 2 --num-attention-heads 2 --seq-length 32 --max-position-embeddings 32 "
TINY += "--micro-batch-size 4 --global-batch-size 8 --tokenizer-type NullTokenizer --vocab-size 500"
SMALL_LAW = ScalingLaw(E=2.0, A=60.0, B=900.0, alpha=0.4, beta=0.45)


def _write_run(d: Path, hidden: int, tensorboard: bool) -> None:
    """A run whose validation losses follow SMALL_LAW, as train.log lines or TensorBoard scalars."""
    from megatron_lite.arguments import parse_args
    from megatron_lite.estimate.sweep import non_embedding_params

    d.mkdir(parents=True)
    flags = f"{TINY} --hidden-size {hidden}".split()
    (d / "args.txt").write_text("\n".join(flags) + "\n")
    n = non_embedding_params(parse_args(flags))
    losses = {it: float(SMALL_LAW.loss(n, it * 8 * 32)) for it in range(100, 1001, 100)}
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(str(d / "tensorboard"))
        for it, loss in losses.items():
            w.add_scalar("lm loss validation", loss, it)
        w.close()
        return
    lines = []
    for it, loss in losses.items():
        kw = dict(iteration=it, train_iters=1000, consumed_samples=8 * it, elapsed_ms=1.0, lr=1e-3)
        kw |= dict(global_batch_size=8, losses={"lm loss": loss + 0.1}, loss_scale=1.0)
        kw |= dict(grad_norm=1.0, skipped=0, nans=0, tokens_per_sec=1.0, tflops_per_device=0.0)
        lines.append(format_log_line(**kw, mfu=None))
        lines.append(
            f" validation loss at iteration {it} | lm loss value: {loss:.6E} | lm loss PPL: 1 |"
        )
    (d / "train.log").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_tool_reads_log_lines_and_tensorboard_files_and_plans_the_layout(tmp_path):
    runs = []
    for k, hidden in enumerate((32, 64, 128, 256)):
        _write_run(tmp_path / f"h{hidden}", hidden, tensorboard=k % 2 == 1)
        runs.append(str(tmp_path / f"h{hidden}"))
    cmd = [sys.executable, "tools/scaling_laws.py", "--runs", *runs, "--budget-flops", "1e18"]
    cmd += ["--flops", "exact", "--world-size", "8", "--json", str(tmp_path / "law.json")]
    cmd += ["--run-estimate"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    law = json.loads((tmp_path / "law.json").read_text())["law"]
    for name in ("E", "alpha", "beta"):
        assert law[name] == pytest.approx(getattr(SMALL_LAW, name), rel=1e-3), name
    assert "40 points from 4 runs" in out.stdout
    assert "lay it out: python tools/estimate.py --num-layers" in out.stdout
    assert "best layouts on 8 GPUs" in out.stdout  # tools/estimate.py --search ran on the plan
    plan = json.loads((tmp_path / "law.json").read_text())["plan"]
    assert plan["n"] > 0 and plan["d"] > 0 and "--search" in plan["estimate_flags"]
    # the training log lines of the two runs that have a log
    train = [sys.executable, "tools/scaling_laws.py", "--runs", *runs[::2], "--split", "train"]
    out = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "20 points from 2 runs" in out.stdout, out.stdout + out.stderr


def test_tool_names_a_run_without_flags_or_losses(tmp_path):
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, "tools/scaling_laws.py", "--runs", str(tmp_path / "empty")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no args.txt" in out.stderr, out.stderr
    (tmp_path / "empty" / "args.txt").write_text(TINY + " --hidden-size 32\n")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no validation losses" in out.stderr, out.stderr


# ---------------------------------------------------------------- a real sweep

# examples/scaling_sweep.sh's defaults: hidden 16, 32, 48, 64, 96 (2 layers), 600 iterations of
# 16 x 64 tokens at a constant learning rate, validation every 50; about 2 minutes on 2 idle cores.
# h48 (the middle size) is held out; the fit uses the evaluations from iteration 200 on.
SWEEP = {"SIZES": "16 32 48 64 96", "ITERS": "600", "CORPUS_MB": "2", "FIT": "0"}


@pytest.mark.slow
def test_real_tiny_sweep_predicts_a_held_out_size_within_2_percent(tmp_path):
    env = {**os.environ, **SWEEP, "OUT": str(tmp_path / "sweep"), "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", "examples/scaling_sweep.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = sorted(str(p) for p in (tmp_path / "sweep" / "runs").iterdir())
    cmd = [sys.executable, "tools/scaling_laws.py", "--runs", *runs, "--min-iteration", "200"]
    cmd += ["--hold-out", "h48", "--json", str(tmp_path / "law.json"), "--budget-flops", "1e15"]
    fitted = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert fitted.returncode == 0, fitted.stdout + fitted.stderr
    held = json.loads((tmp_path / "law.json").read_text())["held_out"]["h48"]
    assert held["D"] == 600 * 16 * 64  # its last evaluation
    error = held["predicted"] / held["measured"] - 1
    assert abs(error) < 0.02, fitted.stdout


def test_tool_names_the_line_of_a_non_numeric_losses_row(tmp_path):
    rows = [f"{n},{20 * n},{SMALL_LAW.loss(n, 20 * n)}" for n in (1e6, 2e6, 4e6, 8e6, 16e6, 32e6)]
    good = tmp_path / "good.csv"
    good.write_text("N,D,loss\n" + "\n".join(rows) + "\n")
    cmd = [sys.executable, "tools/scaling_laws.py", "--losses", str(good)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr  # the header is skipped, 6 points fit
    bad = tmp_path / "bad.csv"
    bad.write_text("N,D,loss\n" + "\n".join(rows[:3] + ["4e6,8e7,oops"] + rows[3:]) + "\n")
    cmd[-1] = str(bad)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{bad}:5: '4e6,8e7,oops': expected N,D,loss numbers" in out.stderr, out.stderr
