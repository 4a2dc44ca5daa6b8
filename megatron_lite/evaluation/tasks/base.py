"""What a task is: its documents (`Doc`) and how their prompts are built (`Task`), and the error a
task file that cannot be read raises (`TaskError`). The readers (readers.py, mmlu.py, humaneval.py)
build them; the package's __init__ names the readers."""

from __future__ import annotations

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
