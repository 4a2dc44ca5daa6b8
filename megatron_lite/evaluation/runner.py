"""Score tasks with a Scorer: build each task's requests, run them batched, compute its metrics.

    results = evaluate_tasks(scorer, load_tasks("lambada=lambada.jsonl,arc_easy=arc.jsonl"))
    print(format_results(results))

Used by tools/evaluate.py and by pretraining's `--eval-tasks`; the lm-eval adapter answers the same
requests through the same Scorer, so the two give the same scores.
"""

from __future__ import annotations

from megatron_lite.evaluation import metrics
from megatron_lite.evaluation.requests import Scorer
from megatron_lite.evaluation.tasks import Task, humaneval


def _choice_task(scorer: Scorer, task: Task, contexts: list[str]) -> dict[str, float]:
    requests = [
        (ctx, doc.delimiter + choice)
        for ctx, doc in zip(contexts, task.docs)
        for choice in doc.choices
    ]
    results = iter(scorer.loglikelihood(requests))
    if task.kind == "loglikelihood":  # one continuation each: LAMBADA
        lls, greedy = zip(*[next(results) for _ in task.docs])
        return {"acc": sum(greedy) / len(greedy), "perplexity": metrics.perplexity(lls)}
    accs, norms = [], []
    for doc in task.docs:
        lls = [next(results)[0] for _ in doc.choices]
        accs.append(metrics.acc(lls, doc.gold))
        norms.append(metrics.acc_norm(lls, doc.choices, doc.gold))
    return {"acc": sum(accs) / len(accs), "acc_norm": sum(norms) / len(norms)}


def _rolling_task(scorer: Scorer, task: Task) -> dict[str, float]:
    texts = [doc.text for doc in task.docs]
    lls = scorer.loglikelihood_rolling(texts)
    return {
        "word_perplexity": metrics.word_perplexity(lls, texts),
        "byte_perplexity": metrics.byte_perplexity(lls, texts),
        "bits_per_byte": metrics.bits_per_byte(lls, texts),
    }


def _code_task(
    scorer: Scorer, task: Task, num_samples: int, ks: tuple[int, ...], gen: dict
) -> dict[str, float]:
    from megatron_lite.evaluation.sandbox import run_program

    kw = {"until": humaneval.STOP, "max_gen_toks": 256, **gen}
    if num_samples > 1:
        kw.setdefault("temperature", 0.8)
        kw.setdefault("top_p", 0.95)
    requests = [
        (doc.context, {**kw, "seed": kw.get("seed", 0) + 1000 * s})
        for doc in task.docs
        for s in range(num_samples)
    ]
    completions = iter(scorer.generate_until(requests))
    passed = []
    for doc in task.docs:
        ok = [
            run_program(humaneval.program(doc, next(completions))).passed
            for _ in range(num_samples)
        ]
        passed.append(sum(ok))
    return {
        f"pass@{k}": sum(metrics.pass_at_k(num_samples, c, k) for c in passed) / len(passed)
        for k in ks
        if k <= num_samples
    }


def evaluate_task(
    scorer: Scorer,
    task: Task,
    num_fewshot: int = 0,
    seed: int = 1234,
    num_samples: int = 1,
    ks: tuple[int, ...] = (1, 10, 100),
    gen: dict | None = None,
    context_free: bool = False,
) -> dict[str, float]:
    """One task's metrics. Every rank calls it alike and gets the same numbers; the code task
    runs its programs on every rank (cheap, and no rank waits for another's verdict).
    `context_free`: score the choices with no context at all (only the end-of-document token
    before them): the baseline a model that ignores context reaches on the same task."""
    if context_free:
        if task.kind not in ("multiple_choice", "loglikelihood"):
            raise ValueError(f"{task.name}: a context-free baseline is for choice tasks")
        return _choice_task(scorer, task, [""] * len(task.docs))
    if task.kind == "rolling":
        return _rolling_task(scorer, task)
    if task.kind == "generate":
        return _code_task(scorer, task, num_samples, ks, gen or {})
    return _choice_task(scorer, task, task.contexts(num_fewshot, seed))


def evaluate_tasks(scorer: Scorer, tasks: list[Task], **kwargs) -> dict[str, dict[str, float]]:
    return {task.name: evaluate_task(scorer, task, **kwargs) for task in tasks}


def number(v: float) -> str:
    """4 decimals, or 4 significant digits for the large values perplexities reach."""
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4e}"


def format_results(results: dict[str, dict[str, float]]) -> str:
    """A table: task, metric, value (the shape lm-eval prints)."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, scores in results.items():
        lines += [f"| {task} | {m} | {number(v)} |" for m, v in scores.items()]
    return "\n".join(lines)


def flat_scalars(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"eval/lambada/acc": 0.31, ...} for TensorBoard."""
    return {f"eval/{t}/{m}": v for t, s in results.items() for m, v in s.items()}
