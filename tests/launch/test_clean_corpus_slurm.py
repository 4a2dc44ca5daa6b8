"""examples/clean_corpus_array.sbatch on the local two-node SLURM cluster (tests/launch/slurm_ci.sh):
an array job of 4 shards (pass 1), then a job depending on it (pass 2, the global near-duplicate
pass), gives byte for byte the files that one process cleaning everything gives. The script's
fail-fast checks run under bash alone (no cluster needed)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch_util import ROOT
from launching import LAUNCH_TIMEOUT, clean_env

from megatron_lite.data.cleaning.synthetic import CorpusGenerator

SCRIPT = ROOT / "examples" / "clean_corpus_array.sbatch"
SHARDS = 4


def make_inputs(tmp: Path, files: int = 6) -> list[str]:
    docs = list(CorpusGenerator(seed=4).documents(480, edit_rate=0.02))
    paths = []
    for k in range(files):
        path = tmp / (f"part{k}.jsonl" + (".gz" if k % 2 else ""))
        opener = gzip.open if k % 2 else open
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines(docs[k::files])
        paths.append(str(path))
    return paths


@pytest.mark.slow
def test_array_job_then_global_pass_cleans_like_one_process(slurm_cluster, tmp_path):
    inputs = make_inputs(tmp_path)
    flags = "--jaccard-threshold 0.7 --heuristics gopher_quality"
    env = slurm_cluster.job_env(
        INPUTS=" ".join(inputs),
        WORK_DIR=str(tmp_path / "work"),
        OUTPUT_DIR=str(tmp_path / "clean"),
        CLEAN_ARGS=flags,
    )
    submit = ["sbatch", "--parsable", f"--array=0-{SHARDS - 1}", f"--chdir={ROOT}"]
    submit += [f"--output={tmp_path}/scan-%a.out", str(SCRIPT)]
    out = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    dedup = ["sbatch", "--wait", f"--dependency=afterok:{job}", f"--chdir={ROOT}"]
    dedup += [f"--output={tmp_path}/dedup.out", str(SCRIPT)]
    out = subprocess.run(
        dedup, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    logs = {p.name: p.read_text() for p in sorted(tmp_path.glob("*.out"))}
    assert out.returncode == 0, (out.stderr, logs)
    for shard in range(SHARDS):
        log = logs[f"scan-{shard}.out"]
        assert f"pass 1, shard {shard} of {SHARDS}" in log, log
        files = len(inputs[shard::SHARDS])
        assert f"clean_corpus scan: shard {shard} of {SHARDS}: {files} files" in log, log
    assert "pass 2 (global near-duplicate pass)" in logs["dedup.out"]

    # the same cleaning in one process
    local = [sys.executable, "tools/clean_corpus.py", "--input", *inputs, *flags.split()]
    local += ["--output-dir", str(tmp_path / "local")]
    done = subprocess.run(local, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for path in inputs:
        name = Path(path).name
        opener = gzip.open if name.endswith(".gz") else open
        with (
            opener(tmp_path / "clean" / name, "rb") as a,
            opener(tmp_path / "local" / name, "rb") as b,
        ):
            assert a.read() == b.read(), name
    sharded = json.loads((tmp_path / "clean" / "report.json").read_text())
    single = json.loads((tmp_path / "local" / "report.json").read_text())
    assert sharded["shards"] == SHARDS and single["shards"] == 1
    assert sharded["stats"]["dropped"] == single["stats"]["dropped"]
    assert sharded["stats"]["dropped"]["near_duplicate"] > 10  # found across shards, too


def _bash(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30
    )


def test_array_script_fails_at_once_naming_the_variable(tmp_path):
    env = clean_env(MEGATRON_LITE_DIR=str(ROOT))
    out = _bash(env)
    assert out.returncode == 2 and "WORK_DIR is not set" in out.stderr, out.stderr
    env["WORK_DIR"] = str(tmp_path / "work")
    out = _bash({**env, "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"})
    assert out.returncode == 2 and "INPUTS is not set" in out.stderr, out.stderr
    out = _bash({**env, "SLURM_ARRAY_TASK_ID": "0", "INPUTS": f"{tmp_path}/none.jsonl"})
    assert out.returncode == 2 and f"INPUTS: {tmp_path}/none.jsonl: no such file" in out.stderr
    out = _bash({**env, "OUTPUT_DIR": str(tmp_path / "out")})
    assert out.returncode == 2 and "not inside a SLURM job" in out.stderr, out.stderr
    out = _bash({**clean_env(SLURM_SUBMIT_DIR=str(tmp_path)), "WORK_DIR": "w"})
    assert out.returncode == 2 and "submit from the megatron_lite checkout" in out.stderr
