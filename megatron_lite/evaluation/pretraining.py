"""`--eval-tasks` during pretraining: score downstream tasks with the model being trained.

The training model's chunk is wrapped as a `LanguageModel` (the same stage-to-stage forward
generation uses, one model replica per dp group), so the scores are those tools/evaluate.py gives
for the checkpoint saved at that iteration. Requests are split over the dp replicas.
"""

from __future__ import annotations

from functools import lru_cache

from megatron_lite.config import Config
from megatron_lite.evaluation.requests import Scorer
from megatron_lite.evaluation.runner import evaluate_tasks, flat_scalars, number
from megatron_lite.evaluation.tasks import Task, load_tasks
from megatron_lite.inference.generation import LanguageModel
from megatron_lite.training.log import print_rank
from megatron_lite.training.step import land_params

BATCH_SIZE = 8


@lru_cache(maxsize=4)
def _tasks(specs: tuple[str, ...], tasks_dir: str | None) -> tuple[Task, ...]:
    return tuple(load_tasks(list(specs), tasks_dir))


def check_eval_tasks(cfg: Config) -> None:
    """At setup, so a bad --eval-tasks fails before training: names, files, layout."""
    train = cfg.train
    if not train.eval_tasks:
        return
    _tasks(tuple(train.eval_tasks), train.eval_tasks_dir)


def score_tasks(run) -> dict[str, dict[str, float]]:
    """Every rank calls it; every rank gets the results."""
    cfg = run.cfg
    land_params(run)
    modules = [getattr(c, "module", c) for c in run.model]
    lm = LanguageModel(
        modules[0],
        cfg,
        run.ps,
        run.tokenizer.vocab_size,
        path="(training)",
        chunks=modules if len(modules) > 1 else None,
    )
    tasks = _tasks(tuple(cfg.train.eval_tasks), cfg.train.eval_tasks_dir)
    for c in run.model:
        c.eval()
    try:
        return evaluate_tasks(
            Scorer(lm, run.tokenizer, BATCH_SIZE),
            list(tasks),
            num_fewshot=cfg.train.eval_num_fewshot,
            seed=cfg.train.seed,
        )
    finally:
        for c in run.model:
            c.train()


def report_tasks(run, tb) -> dict[str, dict[str, float]]:
    """Score --eval-tasks, print one line (last rank) and write TensorBoard scalars."""
    results = score_tasks(run)
    if run.is_logging_rank:
        fields = " | ".join(
            f"{t} {m}: {number(v)}" for t, s in results.items() for m, v in s.items()
        )
        print_rank(f" downstream tasks at iteration {run.iteration} | {fields} |")
        tb.add_scalars(flat_scalars(results), run.iteration)
    return results
