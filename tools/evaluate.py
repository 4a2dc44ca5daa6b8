"""Score a checkpoint (megatron_lite, any layout, or a Hugging Face directory) on downstream tasks.

    python tools/evaluate.py --load ckpt --tasks lambada=data/lambada_test.jsonl,arc_easy=arc.jsonl
    python tools/evaluate.py --load ckpt --tasks-dir data/eval --tasks lambada,hellaswag,mmlu \
        --num-fewshot 5 --output results.json
    python tools/evaluate.py --load ckpt --tasks humaneval=HumanEval.jsonl.gz --num-samples 10
    torchrun --nproc_per_node=4 tools/evaluate.py --load ckpt --tensor-model-parallel-size 2 ...

Under torchrun the ranks form tp x pp model replicas (pp = --pipeline-model-parallel-size, tp =
--tensor-model-parallel-size, dp = the rest); requests are split over the replicas. Rank 0 prints
a table (and writes --output as JSON). Tasks: see megatron_lite/evaluation/tasks; a task without a
path is looked up in --tasks-dir by its usual file name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch.distributed as dist  # noqa: E402

from megatron_lite.cli import report_user_error, run_main  # noqa: E402
from megatron_lite.errors import UserError  # noqa: E402
from megatron_lite.evaluation.requests import Scorer  # noqa: E402
from megatron_lite.evaluation.runner import (  # noqa: E402
    evaluate_task,
    evaluate_tasks,
    format_results,
)
from megatron_lite.evaluation.tasks import known_tasks, load_tasks  # noqa: E402
from megatron_lite.inference.tool_args import (  # noqa: E402
    add_checkpoint_args,
    finish_tool,
    load_for_tool,
    tool_parallel_state,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p)
    p.add_argument("--tasks", required=True, help=f"Comma-separated NAME[=PATH]: {known_tasks()}")
    p.add_argument("--tasks-dir", help="Where tasks given without a path are looked up.")
    p.add_argument("--num-fewshot", type=int, default=0, help="Solved examples per prompt.")
    p.add_argument("--seed", type=int, default=1234, help="Few-shot draws (lm-eval's default).")
    p.add_argument("--batch-size", type=int, default=8, help="Requests per forward.")
    p.add_argument("--num-samples", type=int, default=1, help="Code tasks: samples per problem.")
    p.add_argument("--max-gen-toks", type=int, default=256, help="Code tasks: tokens per sample.")
    p.add_argument(
        "--context-free-baseline",
        action="store_true",
        help="Also score choice tasks with no context (as TASK:context-free).",
    )
    p.add_argument("--output", help="Write the results here as JSON.")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return p


def run(args: argparse.Namespace) -> dict:
    tasks = load_tasks(args.tasks, args.tasks_dir)  # bad names and files fail before the model
    ps = tool_parallel_state(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    lm, tokenizer = load_for_tool(args, ps, data_parallel=True)
    scorer = Scorer(lm, tokenizer, args.batch_size)
    results = evaluate_tasks(
        scorer,
        tasks,
        num_fewshot=args.num_fewshot,
        seed=args.seed,
        num_samples=args.num_samples,
        gen={"max_gen_toks": args.max_gen_toks},
    )
    if args.context_free_baseline:
        for task in tasks:
            if task.kind in ("multiple_choice", "loglikelihood"):
                results[f"{task.name}:context-free"] = evaluate_task(
                    scorer, task, context_free=True
                )
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = run(args)
        rc = 0
    except (UserError, ValueError, FileNotFoundError) as e:  # bad flags, files, tasks
        results, rc = None, report_user_error(e)  # one line, from one rank
    if results is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        print(format_results(results), flush=True)
        if args.output:
            with open(args.output, "w") as f:
                json.dump(results, f, indent=2)
    return finish_tool(rc)


if __name__ == "__main__":
    sys.exit(run_main(main))
