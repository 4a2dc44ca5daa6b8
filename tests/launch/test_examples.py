"""The launch examples, run unchanged and configured by variables only, as a user runs them.

* Each fails at once, naming the variable, when a required path is missing or wrong, and refuses a bad
  layout (bash only); an sbatch script finds the checkout and, run by bash, stops at "not in a job".
* examples/pretrain_gpt_single_node.sh: torchrun on this machine, 2 ranks (tp 2), tiny GPT.
* examples/pretrain_gpt_multinode.sbatch on the local two-node SLURM cluster (tests/launch/slurm_ci.sh),
  2 nodes x 2 ranks = tp 2 x pp 2: SIGTERM mid-run (what SLURM sends before the time limit) saves a
  checkpoint and the job ends 0; the same script submitted again resumes from it to the end.
* examples/pretrain_llama_multinode.sbatch, tp 1 x pp 2 x dp 2, AUTO_REQUEUE=1: SIGTERM mid-run saves,
  the job requeues itself (same job id, restart 1) and resumes to the end; its checkpoint exports to
  Hugging Face (tools/checkpoint/convert.py --check) and generates (tools/generate.py).

Data: a small corpus of the Python standard library, tokenized with a GPT-2 BPE and a SentencePiece
model trained here (tools/train_tokenizer.py, tools/preprocess_data.py). Every launch's losses equal,
iteration by iteration and across the interruptions, one process running the same flags at tp 1 x pp 1
within 1e-5 relative. CPU/gloo and fp32 throughout (SBATCH_GPUS_PER_NODE=0 drops the GPU request).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from launch_util import ROOT, build_corpus, losses
from launching import LAUNCH_TIMEOUT, assert_same_losses, clean_env, run_group

from megatron_lite.checkpointing import read_latest_iteration

EXAMPLES = ROOT / "examples"
ITERS = 30
# A tiny model, everything else as a user sets it; one log line per iteration, no evaluation.
SMALL = {
    **dict(NUM_LAYERS="4", HIDDEN_SIZE="64", NUM_ATTENTION_HEADS="4", SEQ_LENGTH="32"),
    **dict(MICRO_BATCH_SIZE="2", GLOBAL_BATCH_SIZE="8", TRAIN_ITERS=str(ITERS), PRECISION="fp32"),
    **dict(LR="1e-3", MIN_LR="1e-4", LR_WARMUP_ITERS="2", LOG_INTERVAL="1"),
    **dict(SAVE_INTERVAL="1000", EVAL_INTERVAL="1000", EVAL_ITERS="0"),
    "EXTRA_ARGS": "--hidden-dropout 0 --attention-dropout 0 --distributed-timeout-minutes 1",
}
LLAMA_SHAPE = {"NUM_QUERY_GROUPS": "2", "FFN_HIDDEN_SIZE": "128"}
SCRIPTS = {
    "gpt": EXAMPLES / "pretrain_gpt_multinode.sbatch",
    "llama": EXAMPLES / "pretrain_llama_multinode.sbatch",
}


def example_vars(flavour: str, files: dict, ckpt: Path, **layout: str) -> dict[str, str]:
    """The variables a user sets for `flavour` (gpt | llama) with these data and tokenizer files."""
    paths = {"DATA_PATH": files["data_path"], "CHECKPOINT_PATH": ckpt}
    if flavour == "gpt":
        paths |= {"VOCAB_FILE": files["vocab_file"], "MERGE_FILE": files["merge_file"]}
    else:
        paths |= {"TOKENIZER_MODEL": files["tokenizer_model"], **LLAMA_SHAPE}
    return {**SMALL, **{k: str(v) for k, v in paths.items()}, **layout}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return {
        "gpt": build_corpus(d, "GPT2BPETokenizer", max_mb=0.3),
        "llama": build_corpus(d, "SentencePieceTokenizer", max_mb=0.3),
    }


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """{flavour: {iteration: loss}}: one plain process running the flags the examples build
    (examples/_launch_common.sh's build_args) for the same variables at tp 1 x pp 1."""
    refs = {}
    for flavour, files in corpus.items():
        tmp = tmp_path_factory.mktemp(f"reference-{flavour}")
        env = clean_env(**example_vars(flavour, files, tmp / "ckpt", TP="1", PP="1"))
        script = "EXAMPLE=test; source examples/_launch_common.sh; require_paths $1; "
        script += 'build_args $1; printf "%s\\0" "${ARGS[@]}"'
        args = subprocess.run(
            ["bash", "-c", script, "bash", flavour],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")[:-1]
        cmd = [sys.executable, "-m", "megatron_lite.pretrain_gpt"]
        [(rc, out)] = run_group([(cmd + args, env)], tmp)
        assert rc == 0, out[-4000:]
        assert "world 1 = tp 1 x pp 1 x dp 1" in out
        refs[flavour] = ref = losses(out)
        assert sorted(ref) == list(range(1, ITERS + 1)), out[-3000:]
        assert ref[ITERS] < ref[1]  # it learns
    return refs


def assert_checkpoint(ckpt: Path, iteration: int, tp: int, pp: int, latest: bool = True) -> None:
    """`iteration`'s directory holds one file per tp x pp rank; with `latest`, the latest iteration
    file names it."""
    assert not latest or read_latest_iteration(str(ckpt)) == iteration
    ranks = sorted((ckpt / f"iter_{iteration:07d}").iterdir())
    suffix = (lambda p: f"_{p:03d}") if pp > 1 else (lambda p: "")
    want = sorted(f"mp_rank_{t:02d}{suffix(p)}" for t in range(tp) for p in range(pp))
    assert [r.name for r in ranks] == want
    assert all((r / "model_optim_rng.pt").stat().st_size > 0 for r in ranks)


# ---------------------------------------------------------------- fail fast, bash only


def _dummy_paths(tmp: Path) -> dict[str, str]:
    for name in ("data.bin", "data.idx", "vocab.json", "merges.txt", "tokenizer.model"):
        (tmp / name).write_text("x")
    return {
        "DATA_PATH": str(tmp / "data"),
        "VOCAB_FILE": str(tmp / "vocab.json"),
        "MERGE_FILE": str(tmp / "merges.txt"),
        "TOKENIZER_MODEL": str(tmp / "tokenizer.model"),
        "CHECKPOINT_PATH": str(tmp / "ckpt"),
    }


BAD_PATHS = [  # (variable, value or None for unset, the message's start)
    ("DATA_PATH", None, "DATA_PATH is not set: it must name the prefix"),
    ("DATA_PATH", "{tmp}/nodata", "DATA_PATH={tmp}/nodata: {tmp}/nodata.bin not found"),
    ("DATA_PATH", "0.5 {tmp}/data 0.5 {tmp}/other", "{tmp}/other.bin not found"),
    ("CHECKPOINT_PATH", None, "CHECKPOINT_PATH is not set: it must name the directory"),
    ("CHECKPOINT_PATH", "{tmp}/no/ckpt", "parent directory {tmp}/no does not exist"),
]
GPT_BAD = [
    ("VOCAB_FILE", None, "VOCAB_FILE is not set: it must name a GPT-2 BPE vocab.json"),
    ("MERGE_FILE", "{tmp}/nomerges.txt", "MERGE_FILE={tmp}/nomerges.txt: no such file"),
]
LLAMA_BAD = [
    ("TOKENIZER_MODEL", None, "TOKENIZER_MODEL is not set: it must name a SentencePiece"),
    ("TOKENIZER_MODEL", "{tmp}", "TOKENIZER_MODEL={tmp}: a directory without tokenizer.json"),
]
FAIL_CASES = [
    (script, *case)
    for script, cases in (
        ("pretrain_gpt_single_node.sh", BAD_PATHS + GPT_BAD),
        ("pretrain_gpt_multinode.sbatch", BAD_PATHS + GPT_BAD),
        ("pretrain_llama_multinode.sbatch", BAD_PATHS + LLAMA_BAD),
    )
    for case in cases
]


@pytest.mark.parametrize("script, var, value, message", FAIL_CASES)
def test_example_fails_at_once_naming_a_missing_or_wrong_path(
    script, var, value, message, tmp_path
):
    env = clean_env(**_dummy_paths(tmp_path))
    if value is None:
        del env[var]
    else:
        env[var] = value.format(tmp=tmp_path)
    out = subprocess.run(
        ["bash", str(EXAMPLES / script)], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith(f"{script}: "), out.stderr
    assert message.format(tmp=tmp_path) in out.stderr
    assert out.stdout == ""  # nothing started
    assert not (tmp_path / "ckpt").exists() or var == "CHECKPOINT_PATH"


@pytest.mark.parametrize("script", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_sbatch_example_run_by_bash_finds_the_checkout_and_stops_outside_a_job(script, tmp_path):
    """sbatch runs a spooled copy of the script: it finds the checkout through the submit directory
    (SLURM_SUBMIT_DIR) or MEGATRON_LITE_DIR."""
    env = clean_env(**_dummy_paths(tmp_path), SLURM_SUBMIT_DIR=str(tmp_path))
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert "submit from the megatron_lite checkout, or set MEGATRON_LITE_DIR to it" in out.stderr
    env["MEGATRON_LITE_DIR"] = str(ROOT)  # found; every variable is right, but this is no job
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert "not inside a SLURM job: submit this script with sbatch" in out.stderr


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"TP": "3"}, "the world size (8 GPUs) must be divisible by TP x PP (3 x 2 = 6)"),
        ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE must be a positive integer, not '0'"),
        ({"GLOBAL_BATCH_SIZE": "100"}, "GLOBAL_BATCH_SIZE (100) must be divisible by"),
        ({"PRECISION": "fp8"}, "PRECISION must be bf16, fp16 or fp32, not 'fp8'"),
    ],
)
def test_single_node_example_refuses_a_bad_layout_or_precision(variables, message, tmp_path):
    env = clean_env(**_dummy_paths(tmp_path), **variables)
    script = EXAMPLES / "pretrain_gpt_single_node.sh"
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr, out.stderr


# ---------------------------------------------------------------- one node, torchrun


@pytest.mark.slow
def test_single_node_example_matches_single_process(corpus, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    env = clean_env(**example_vars("gpt", corpus["gpt"], ckpt, GPUS_PER_NODE="2", TP="2", PP="1"))
    cmd = ["bash", str(EXAMPLES / "pretrain_gpt_single_node.sh")]
    [(rc, out)] = run_group([(cmd, env)], tmp_path)
    assert rc == 0, out[-4000:]
    assert "2 ranks = tp 2 x pp 1 x dp 1" in out
    assert "world 2 = tp 2 x pp 1 x dp 1" in out
    assert_same_losses(out, reference["gpt"])
    assert_checkpoint(ckpt, ITERS, tp=2, pp=1)
    assert list((ckpt / "tensorboard").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------- SLURM: sbatch, SIGTERM, resume


def _wait_for(condition, what: str, proc=None, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"sbatch ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.2)


def wait_for_job(cluster, job: str, state: str) -> str:
    """Poll `scontrol -o show job JOB` until it matches `state` (a regex); that line. Polled often:
    SLURM forgets an ended job MinJobAge (2 s) after its end."""
    line = ""

    def matches() -> bool:
        nonlocal line
        cmd = ["scontrol", "-o", "show", "job", job]
        line = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True).stdout
        return re.search(state, line) is not None

    _wait_for(matches, f"job {job} in state {state}")
    return line


@contextmanager
def sbatch_then_sigterm(cluster, script: Path, out: Path, env: dict):
    """`sbatch --wait` the example from the checkout (the scripts find examples/_launch_common.sh in
    the submit directory); once its log shows iteration 3, `scancel --signal=TERM` the job
    (what SLURM does before the time limit: every process of its steps gets SIGTERM). Yields the
    sbatch process and the job id; kills sbatch (not the job) on the way out if it still runs."""
    jobid = out.with_suffix(".jobid")
    with open(jobid, "w") as f:
        cmd = cluster.sbatch_command(script, out, parsable=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        logged = lambda: out.exists() and re.search(r" iteration\s+3/", out.read_text())  # noqa: E731
        _wait_for(logged, "iteration 3", proc)
        job = jobid.read_text().split()[0]
        cluster.client("scancel", "--signal=TERM", job)
        yield proc, job
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_stopped_on_the_signal(log: Path, ckpt: Path, reference: dict, tp: int, pp: int) -> int:
    """The run saved at the iteration after SIGTERM and exited 0, with the reference's losses so far;
    that iteration."""
    text = log.read_text()
    stop = re.search(r"exiting at iteration (\d+) \(signal\)", text)
    assert stop, text[-3000:]
    saved = int(stop.group(1))
    assert 3 <= saved < ITERS
    assert f"saved checkpoint at iteration {saved:7d}" in text
    assert f"training exited 0; latest checkpoint: iteration {saved} of {ITERS}" in text
    assert_same_losses(text, reference, range(1, saved + 1))
    assert_checkpoint(ckpt, saved, tp, pp, latest=False)
    return saved


def assert_resumed_to_the_end(log: Path, ckpt: Path, saved: int, reference: dict, tp, pp) -> None:
    text = log.read_text()
    assert f"> loaded checkpoint from {ckpt} at iteration {saved}" in text, text[-3000:]
    assert_same_losses(text, reference, range(saved + 1, ITERS + 1))
    assert f"training exited 0; latest checkpoint: iteration {ITERS} of {ITERS}" in text
    assert_checkpoint(ckpt, ITERS, tp, pp)
    assert list((ckpt / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_gpt_sbatch_saves_on_sigterm_and_a_resubmission_resumes(
    slurm_cluster, corpus, reference, tmp_path
):
    ckpt = tmp_path / "ckpt"
    variables = example_vars("gpt", corpus["gpt"], ckpt, GPUS_PER_NODE="2", TP="2", PP="2")
    env = slurm_cluster.job_env(**variables, SBATCH_GPUS_PER_NODE="0")
    with sbatch_then_sigterm(slurm_cluster, SCRIPTS["gpt"], tmp_path / "1.out", env) as (proc, job):
        rc = proc.wait(timeout=LAUNCH_TIMEOUT)
    first = ckpt / "logs" / f"gpt-pretrain-{job}-restart0.log"
    assert rc == 0, (tmp_path / "1.out").read_text()[-4000:]
    text = first.read_text()
    assert f"job {job} (restart 0): 2 nodes (node[1-2]) x 2 = tp 2 x pp 2 x dp 1" in text
    assert "world 4 = tp 2 x pp 2 x dp 1" in text
    assert "AUTO_REQUEUE" not in text
    saved = assert_stopped_on_the_signal(first, ckpt, reference["gpt"], tp=2, pp=2)

    # the same script, submitted again: resumes from CHECKPOINT_PATH and trains to the end
    cmd = slurm_cluster.sbatch_command(SCRIPTS["gpt"], tmp_path / "2.out", parsable=True)
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (tmp_path / "2.out").read_text()[-4000:]
    second = ckpt / "logs" / f"gpt-pretrain-{again.stdout.split()[0]}-restart0.log"
    assert_resumed_to_the_end(second, ckpt, saved, reference["gpt"], tp=2, pp=2)


@pytest.fixture(scope="module")
def llama_job(slurm_cluster, corpus, tmp_path_factory):
    """The Llama example with AUTO_REQUEUE=1, SIGTERM at iteration 3: (checkpoint dir, job id, the
    job's final `scontrol show job` line)."""
    tmp = tmp_path_factory.mktemp("llama-job")
    ckpt = tmp / "ckpt"
    variables = example_vars("llama", corpus["llama"], ckpt, GPUS_PER_NODE="2", TP="1", PP="2")
    env = slurm_cluster.job_env(**variables, SBATCH_GPUS_PER_NODE="0", AUTO_REQUEUE="1")
    with sbatch_then_sigterm(slurm_cluster, SCRIPTS["llama"], tmp / "job.out", env) as (_, job):
        # The job requeues itself. SLURM holds a requeued job for its credential lifetime (2 min by
        # default): start it sooner, but not within the second its credential was revoked in (the
        # nodes would refuse it: "Job credential revoked"). `sbatch --wait` may return at the
        # requeue, so follow the job itself.
        wait_for_job(slurm_cluster, job, r"JobState=PENDING .*Restarts=1")
        time.sleep(2)
        slurm_cluster.client("scontrol", "update", f"JobId={job}", "StartTime=now")
        final = wait_for_job(slurm_cluster, job, r"JobState=(COMPLETED|FAILED|CANCELLED|TIMEOUT)")
    return ckpt, job, final


@pytest.mark.slow
def test_llama_sbatch_requeues_itself_after_sigterm_and_resumes(llama_job, reference):
    ckpt, job, final = llama_job
    assert re.search(r"JobState=COMPLETED .*Restarts=1 .*ExitCode=0:0", final), final
    first, second = (ckpt / "logs" / f"llama-pretrain-{job}-restart{n}.log" for n in (0, 1))
    text = first.read_text()
    assert "2 nodes (node[1-2]) x 2 = tp 1 x pp 2 x dp 2" in text
    assert f"AUTO_REQUEUE: requeueing job {job}" in text
    saved = assert_stopped_on_the_signal(first, ckpt, reference["llama"], tp=1, pp=2)
    assert f"job {job} (restart 1)" in second.read_text()
    assert_resumed_to_the_end(second, ckpt, saved, reference["llama"], tp=1, pp=2)
    assert "AUTO_REQUEUE" not in second.read_text()  # done: not requeued again


@pytest.mark.slow
def test_llama_checkpoint_exports_to_hf_and_generates(llama_job, tmp_path):
    """README "Running on a cluster", the last steps: convert to Hugging Face, then generate."""
    ckpt = llama_job[0]
    convert = [sys.executable, "tools/checkpoint/convert.py", "--saver", "hf"]
    convert += ["--load-dir", str(ckpt), "--save-dir", str(tmp_path / "hf"), "--check"]
    out = subprocess.run(convert, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check passed" in out.stdout
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert (tmp_path / "hf" / "tokenizer.model").exists()  # the run's SentencePiece model
    results = []
    for load in (ckpt, tmp_path / "hf"):  # the checkpoint, and the export with its tokenizer
        generate = [
            sys.executable,
            "tools/generate.py",
            "--load",
            str(load),
            "--prompt",
            "def main(",
        ]
        generate += ["--max-new-tokens", "8", "--greedy"]
        out = subprocess.run(generate, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        assert results[-1]["finish_reason"] in ("length", "eod")
        assert 0 < len(results[-1]["tokens"]) <= 8
    assert results[0]["tokens"] == results[1]["tokens"]  # greedy: the same model either way
