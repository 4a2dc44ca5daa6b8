"""The code sandbox (megatron_lite/evaluation/sandbox.py) and HumanEval scoring through it.

Each way a generated program can misbehave (loop forever, fork, write outside its directory, open a
socket, eat memory) must end as a failure within the time limit, leave nothing behind and never
harm the evaluator; a correct program passes. HumanEval's canonical solutions pass, wrong ones fail.
"""

import gzip
import json
import os
import socket
import time

import pytest
import torch
from eval_util import save_tiny_model

from megatron_lite.evaluation.requests import Scorer
from megatron_lite.evaluation.runner import evaluate_task
from megatron_lite.evaluation.sandbox import MAX_OUTPUT_BYTES, run_program
from megatron_lite.evaluation.tasks import load_task
from megatron_lite.evaluation.tasks.humaneval import program
from megatron_lite.inference.generation import build_generation_tokenizer, load_model

PROBLEMS = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "HumanEval/1",
        "prompt": "def rev(s):\n",
        "canonical_solution": "    return s[::-1]\n",
        "test": "def check(candidate):\n    assert candidate('abc') == 'cba'\n",
        "entry_point": "rev",
    },
]


def _sandbox_processes() -> int:
    """Processes running as one of the sandbox's own uids (200000 and up) right now."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            n += os.stat(f"/proc/{pid}").st_uid >= 200_000
        except FileNotFoundError:
            pass
    return n


def test_a_correct_program_passes_and_a_failing_one_fails():
    ok = run_program("import math\nassert math.gcd(12, 18) == 6\nprint('fine')")
    assert (ok.passed, ok.reason, ok.stdout.strip()) == (True, "passed", "fine")
    bad = run_program("assert 1 + 1 == 3")
    assert (bad.passed, bad.reason) == (False, "failed") and "AssertionError" in bad.stderr
    inside = run_program(
        "open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'"
    )
    assert inside.passed  # its own directory is writable


def test_an_endless_loop_is_killed_at_the_time_limit():
    t0 = time.time()
    out = run_program("while True:\n    pass", timeout=2)
    assert (out.passed, out.reason) == (False, "timeout")
    assert time.time() - t0 < 6


def test_a_fork_bomb_fails_and_leaves_no_process():
    for src in (
        "import os\nwhile True:\n    os.fork()",
        "import posix\nwhile True:\n    posix.fork()",
    ):
        out = run_program(src, timeout=3)
        assert not out.passed, out
    sp = run_program("import _posixsubprocess, subprocess\nsubprocess.run(['true'])", timeout=3)
    assert not sp.passed
    assert _sandbox_processes() == 0  # run_program returns once its group is gone


def test_writes_outside_its_directory_fail_and_leave_nothing(tmp_path):
    targets = [tmp_path / "escaped.txt", f"/tmp/ml_sandbox_escape_{os.getpid()}.txt"]
    raw = f"/var/tmp/ml_sandbox_escape_{os.getpid()}.txt"
    sources = [f"open({str(t)!r}, 'w').write('x')" for t in targets]
    sources.append(
        f"import posix\nfd = posix.open({raw!r}, posix.O_WRONLY | posix.O_CREAT)\nposix.write(fd, b'x')"
    )
    try:
        for src in sources:
            out = run_program(src, timeout=3)
            assert not out.passed, (src, out)
        assert not any(os.path.exists(t) for t in [*map(str, targets), raw])
    finally:
        for t in [*map(str, targets), raw]:
            if os.path.exists(t):
                os.remove(t)
    before = set(os.listdir("/tmp"))
    run_program("print(1)")
    assert not {
        n for n in set(os.listdir("/tmp")) - before if n.startswith("megatron_lite_sandbox")
    }


def test_no_network_even_to_a_local_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        for src in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))",
        ):
            out = run_program(src, timeout=3)
            assert not out.passed, out
    finally:
        server.close()


def test_memory_beyond_the_limit_fails():
    out = run_program("x = bytearray(2 * 2**30)", timeout=5, memory_mb=512)
    assert not out.passed and "MemoryError" in out.stderr


@pytest.fixture(scope="module")
def humaneval(tmp_path_factory):
    d = tmp_path_factory.mktemp("humaneval")
    with gzip.open(d / "HumanEval.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(p) + "\n" for p in PROBLEMS)
    return d


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(humaneval):
    task = load_task(f"humaneval={humaneval / 'HumanEval.jsonl.gz'}")
    assert [d.extra["entry_point"] for d in task.docs] == ["add", "rev"]
    for doc in task.docs:
        assert run_program(program(doc, doc.extra["canonical_solution"])).passed
        assert not run_program(program(doc, "    return None\n")).passed


def test_humaneval_runs_end_to_end_with_sampling_and_pass_at_k(humaneval, tmp_path):
    ckpt, _ = save_tiny_model(tmp_path, seq_length=96)
    lm = load_model(ckpt, dtype=torch.float32, device=torch.device("cpu"))
    scorer = Scorer(lm, build_generation_tokenizer(lm))
    task = load_task(f"humaneval={humaneval / 'HumanEval.jsonl.gz'}")
    greedy = evaluate_task(scorer, task, gen={"max_gen_toks": 8})
    assert set(greedy) == {"pass@1"} and greedy["pass@1"] == 0.0  # a random model's code fails
    sampled = evaluate_task(scorer, task, num_samples=2, ks=(1, 2), gen={"max_gen_toks": 8})
    assert set(sampled) == {"pass@1", "pass@2"}


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_a_program_flooding_its_output_fails_and_the_evaluator_keeps_little_of_it():
    """A 1.5 GB writer once pushed the evaluator to 6.3 GiB: what is kept of the output is bounded."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS starts again from now
    before = _peak_rss_kib()
    flood = "import sys\nfor _ in range(200):\n    sys.stdout.write('x' * (1 << 20))\n"
    out = run_program(flood, timeout=30)
    assert not out.passed and out.reason == f"output over {MAX_OUTPUT_BYTES} bytes", out.reason
    assert len(out.stdout) <= 4000
    assert _peak_rss_kib() - before < 64 * 1024  # 200 MB written, under 64 MiB more held
    assert run_program("print('ok')").passed  # and the next program runs as before
