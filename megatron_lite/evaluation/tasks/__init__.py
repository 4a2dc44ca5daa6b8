"""Task readers for the public file formats, and the registry that names them.

A task spec is `NAME` (the file is looked up under a tasks directory by its usual name) or
`NAME=PATH`. Each reader returns a `Task`: its documents in the request type lm-evaluation-harness
uses for it, with the prompts lm-eval's task YAMLs build, so scores are comparable.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_lite.errors import UserError

KINDS = ("multiple_choice", "loglikelihood", "rolling", "generate")


class TaskError(UserError, ValueError):
    """A task that cannot be read: unknown name, missing file, malformed line (file:line)."""


@dataclass
class Doc:
    """One scored example. multiple_choice/loglikelihood: `context` + `delimiter` + each of
    `choices` (`gold` is the right one); rolling: `text`; generate: `context` is the prompt."""

    context: str = ""
    choices: list[str] = field(default_factory=list)
    gold: int = 0
    delimiter: str = " "
    text: str = ""
    extra: dict = field(default_factory=dict)  # reader-specific (HumanEval's test, entry_point)

    def solved(self) -> str:
        """The doc as a worked few-shot example."""
        return self.context + self.delimiter + self.choices[self.gold]


@dataclass
class Task:
    name: str
    kind: str
    docs: list[Doc]
    fewshot_pool: list[Doc] | None = None  # None: the task's own docs, the scored doc left out
    description: Callable[[Doc], str] = lambda doc: ""  # noqa: E731
    groups: list[list[Doc]] | None = None  # MMLU: one few-shot sampler per subject, as lm-eval

    def contexts(self, num_fewshot: int, seed: int) -> list[str]:
        """Each doc's full prompt: description, `num_fewshot` solved examples, the doc's context.
        Few-shot examples are drawn as lm-eval's default sampler draws them: one
        `random.Random(seed)` per task (per subject for MMLU), `sample(pool, k)` per doc in order
        (k + 1 from the task's own docs, the doc itself dropped)."""
        if num_fewshot and self.kind not in ("multiple_choice", "loglikelihood"):
            raise TaskError(f"{self.name}: few-shot prompts are for choice tasks, not {self.kind}")
        out = {}
        for group in self.groups or [self.docs]:
            rnd = random.Random(seed)
            for doc in group:
                shots = []
                if num_fewshot:
                    pool = self.fewshot_pool if self.fewshot_pool is not None else group
                    if self.fewshot_pool is None:
                        drawn = rnd.sample(pool, min(num_fewshot + 1, len(pool)))
                        shots = [d for d in drawn if d is not doc][:num_fewshot]
                    else:
                        pool = [d for d in pool if d.extra.get("group") == doc.extra.get("group")]
                        shots = rnd.sample(pool, min(num_fewshot, len(pool)))
                examples = "".join(s.solved() + "\n\n" for s in shots)
                out[id(doc)] = self.description(doc) + examples + doc.context
        return [out[id(d)] for d in self.docs]


def _readers() -> dict[str, tuple[Callable[[str, str], Task], str]]:
    from megatron_lite.evaluation.tasks import humaneval, mmlu, readers

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
    readers = _readers()
    if name not in readers:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}")
    if not path:
        if tasks_dir is None:
            raise TaskError(
                f"task {name!r} has no file: write {name}=PATH or give a tasks directory "
                f"holding {readers[name][1]}"
            )
        path = os.path.join(tasks_dir, readers[name][1])
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
