"""The distributed test harness reports a failing or hanging rank instead of hanging itself; every
test module keeps a test outside `slow`, so `make test-fast` runs a case of each."""

import ast
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_lite.distributed.testing import DistributedError, run_distributed


def _sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _rank_one_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # the other ranks wait for a peer that will never come


def _rank_zero_hangs():
    if dist.get_rank() == 0:
        while True:
            time.sleep(0.05)


def test_results_come_back_in_rank_order():
    assert run_distributed(_sum_of_ranks, 3) == [3.0, 3.0, 3.0]


def test_a_raising_rank_fails_fast_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(DistributedError, match="boom on rank one") as e:
        run_distributed(_rank_one_raises, 2, timeout=60)
    assert "rank 1" in str(e.value) and "ValueError" in str(e.value)
    assert time.monotonic() - start < 30  # not the 60 s collective timeout


@pytest.mark.slow
def test_a_hanging_rank_fails_after_the_timeout():
    with pytest.raises(DistributedError, match="did not finish"):
        run_distributed(_rank_zero_hangs, 2, timeout=2)


def _return_a_tensor():
    return torch.full((3,), float(dist.get_rank()))


def test_ranks_can_return_tensors():
    out = run_distributed(_return_a_tensor, 2)
    assert [t.tolist() for t in out] == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]


def _is_slow(mark: ast.expr) -> bool:
    """`mark` (a decorator, or a `pytestmark` value: one mark or a list) is `pytest.mark.slow`."""
    if isinstance(mark, ast.List | ast.Tuple):
        return any(_is_slow(m) for m in mark.elts)
    return ast.unparse(mark).endswith("mark.slow")


def _has_a_fast_case(fn: ast.FunctionDef) -> bool:
    """Not marked slow, and (if parametrized over a literal list) some case has no slow mark."""
    if any(_is_slow(d) for d in fn.decorator_list):
        return False
    for d in fn.decorator_list:
        if "parametrize" in ast.unparse(d) and isinstance(d, ast.Call) and len(d.args) > 1:
            cases = d.args[1]
            if isinstance(cases, ast.List | ast.Tuple) and cases.elts:
                return not all("mark.slow" in ast.unparse(c) for c in cases.elts)
    return True


def _fast_tests(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    marks = [
        n.value for n in tree.body if isinstance(n, ast.Assign) and "pytestmark" in ast.unparse(n)
    ]
    if any(_is_slow(m) for m in marks):
        return []
    return [
        n.name
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test_") and _has_a_fast_case(n)
    ]


def test_every_test_module_keeps_a_fast_test_for_make_test_fast():
    root = Path(__file__).parent
    modules = sorted(root.rglob("test_*.py"))
    assert len(modules) > 50  # the whole tree, tests/launch and tests/gpu included
    slow_only = [str(p.relative_to(root)) for p in modules if not _fast_tests(p)]
    assert slow_only == [], f"modules with no test outside `-m 'not slow'`: {slow_only}"


def test_the_fast_test_finder_sees_slow_marks_on_modules_functions_and_cases(tmp_path):
    src = {
        "fast": "def test_a(): pass\n@pytest.mark.slow\ndef test_b(): pass\n",
        "all_slow": "@pytest.mark.slow\ndef test_a(): pass\ndef helper(): pass\n",
        "module_slow": "pytestmark = [pytest.mark.slow]\ndef test_a(): pass\n",
        "cases_slow": "@pytest.mark.parametrize('x', [pytest.param(1, marks=pytest.mark.slow)])\n"
        "def test_a(x): pass\n",
        "one_case_fast": "@pytest.mark.parametrize('x', [0, pytest.param(1, marks=pytest.mark.slow)])\n"
        "def test_a(x): pass\n",
    }
    found = {}
    for name, text in src.items():
        (tmp_path / f"{name}.py").write_text(text)
        found[name] = _fast_tests(tmp_path / f"{name}.py")
    assert found == {
        "fast": ["test_a"],
        "all_slow": [],
        "module_slow": [],
        "cases_slow": [],
        "one_case_fast": ["test_a"],
    }
