"""HumanEval (Chen et al. 2021) from OpenAI's `HumanEval.jsonl.gz` (github.com/openai/human-eval:
task_id, prompt, canonical_solution, test, entry_point): the model completes the prompt, and the
program prompt + completion + test + `check(entry_point)` runs in the sandbox."""

from __future__ import annotations

from megatron_lite.evaluation.tasks.base import Doc, Task
from megatron_lite.evaluation.tasks.readers import _nonempty, field, read_jsonl

# lm-eval's humaneval stop sequences: the completion ends where a new top-level block starts
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def read_humaneval(path: str, name: str = "humaneval") -> Task:
    docs = []
    for where, obj in read_jsonl(path):
        extra = {k: field(obj, k, str, where, "text") for k in ("task_id", "test", "entry_point")}
        extra["canonical_solution"] = obj.get("canonical_solution", "")
        docs.append(Doc(context=field(obj, "prompt", str, where, "the code prompt"), extra=extra))
    return Task(name, "generate", _nonempty(docs, path))


def program(doc: Doc, completion: str) -> str:
    """What runs: the prompt, the completion, the task's tests and the call that checks them."""
    e = doc.extra
    return f"{doc.context}{completion}\n\n{e['test']}\n\ncheck({e['entry_point']})\n"
