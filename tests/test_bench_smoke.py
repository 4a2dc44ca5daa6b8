"""`make bench` keeps working: every benchmark script runs at tiny sizes and prints its figures.

The figures at these sizes mean nothing (and tests never assert wall-clock times); what is checked is
that each script runs to its last line, so an API change cannot silently break a benchmark.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> (tiny arguments, a line its output must contain)
SMOKE = {
    "bench_checkpoint.py": (
        ["--layers", "1", "--hidden", "64", "--repeats", "1"],
        "stream every full tensor",
    ),
    "bench_clean.py": (["--smoke"], "speedup 2 workers vs 1"),
    "bench_context_parallel.py": (
        ["--seq", "64", "--steps", "1", "--cp", "1", "2"],
        "overlap gain",
    ),
    "bench_data.py": (["--corpus-mb", "0.2"], "build_sample_idx"),
    "bench_eval.py": (["--smoke"], "ratio megatron_lite / transformers"),
    "bench_ddp.py": (
        ["--layers", "1", "--hidden", "32", "--vocab", "512", "--steps", "2"],
        "ratio",
    ),
    "bench_model.py": (["--smoke", "--steps", "1"], "ratio vs plain"),
    "bench_moe.py": (["--smoke", "--steps", "1"], "ratio alltoall / allgather"),
    "bench_pipeline.py": ([], "ZB-H1 / 1F1B bubble"),
    "bench_pretrain.py": (["--iters", "7", "--layouts", "1x1x1"], "tokens/s"),
    "bench_serving.py": (["--smoke"], "32 concurrent"),
}
FAST = {"bench_model.py", "bench_pipeline.py"}


def test_every_benchmark_is_covered():
    assert sorted(p.name for p in (ROOT / "bench").glob("bench_*.py")) == sorted(SMOKE)


@pytest.mark.parametrize(
    "script",
    # make test-fast runs the two quickest (under 4 s on 2 cores); make test runs every one
    [pytest.param(s, marks=[] if s in FAST else pytest.mark.slow) for s in sorted(SMOKE)],
)
def test_benchmark_runs_at_tiny_sizes(script, tmp_path):
    args, expected = SMOKE[script]
    if script == "bench_checkpoint.py":
        args = [*args, "--dir", str(tmp_path / "ckpt")]
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert expected in out.stdout, out.stdout[-2000:]


@pytest.mark.slow
def test_gpu_suite_dry_run_prints_its_table():
    """bench/gpu_suite.sh --dry-run: the suite's measurement steps (pretrain_gpt with the SDPA and the
    fused softmax attention paths, an all-reduce over two ranks) at tiny sizes on CPU."""
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run"],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| ") and "`" in ln]
    assert [r.split(" | ")[0] for r in rows] == [
        "| train GPT tiny fp32, sdpa attention",
        "| train GPT tiny fp32, fused attention",
        "| all-reduce bus bandwidth",
    ], out.stdout
    for row in rows:
        figure = row.split(" | ")[1]
        assert float(figure.split()[0].replace(",", "")) > 0, row


def test_make_bench_runs_each_script_and_prints_one_table():
    """bench/run_all.py (what `make bench` runs) knows every script, and its table gets each one's
    comparison lines (here the pipeline simulator's bubbles, the one bench that takes no time)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import run_all

    assert sorted(run_all.ARGS) == sorted(SMOKE)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "pipeline"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    table = out.stdout.split("| bench | s | headline figures |")[1]
    (row,) = [ln for ln in table.splitlines() if ln.startswith("| bench_")]
    assert row.startswith("| bench_pipeline.py | ") and "ZB-H1 / 1F1B bubble" in row, row
