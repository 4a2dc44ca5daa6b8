"""Task readers for the public file formats, and the registry that names them.

A task spec is `NAME` (the file is looked up under a tasks directory by its usual name) or
`NAME=PATH`. Each reader returns a `Task`: its documents in the request type lm-evaluation-harness
uses for it, with the prompts lm-eval's task YAMLs build, so scores are comparable.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from megatron_lite.evaluation.tasks import humaneval, mmlu, readers
from megatron_lite.evaluation.tasks.base import KINDS, Doc, Task, TaskError

__all__ = ["KINDS", "Doc", "Task", "TaskError", "known_tasks", "load_task", "load_tasks"]


def _readers() -> dict[str, tuple[Callable[[str, str], Task], str]]:
    return {
        "lambada": (readers.read_lambada, "lambada_test.jsonl"),
        "hellaswag": (readers.read_hellaswag, "hellaswag_val.jsonl"),
        "arc_easy": (readers.read_arc, "ARC-Easy-Test.jsonl"),
        "arc_challenge": (readers.read_arc, "ARC-Challenge-Test.jsonl"),
        "piqa": (readers.read_piqa, "valid.jsonl"),
        "mmlu": (mmlu.read_mmlu, "mmlu"),
        "humaneval": (humaneval.read_humaneval, "HumanEval.jsonl.gz"),
        "perplexity": (readers.read_text, "text.jsonl"),
        "choice": (readers.read_choice, "choice.jsonl"),
    }


def known_tasks() -> list[str]:
    return sorted(_readers())


def parse_task_spec(spec: str, tasks_dir: str | None = None) -> tuple[str, str]:
    """`NAME` or `NAME=PATH` -> (name, path), the name checked against the known tasks."""
    name, _, path = spec.partition("=")
    name = name.strip()
    known = _readers()
    if name not in known:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}")
    if not path:
        if tasks_dir is None:
            raise TaskError(
                f"task {name!r} has no file: write {name}=PATH or give a tasks directory "
                f"holding {known[name][1]}"
            )
        path = os.path.join(tasks_dir, known[name][1])
    if not os.path.exists(path):
        raise TaskError(f"task {name!r}: {path} does not exist")
    return name, path


def load_task(spec: str, tasks_dir: str | None = None) -> Task:
    name, path = parse_task_spec(spec, tasks_dir)
    return _readers()[name][0](path, name)


def load_tasks(specs: list[str] | str, tasks_dir: str | None = None) -> list[Task]:
    """Comma-separated or listed specs -> tasks (every name checked before any file is read)."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    parsed = [parse_task_spec(s, tasks_dir) for s in specs]
    return [_readers()[n][0](p, n) for n, p in parsed]
