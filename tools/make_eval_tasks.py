"""Tiny downstream tasks from held-out text: the end of a JSONL corpus, which training's --split
leaves to the validation/test splits (documents are split in order).

    python tools/make_eval_tasks.py --input demo_out/data/corpus.jsonl --output-dir demo_out/eval \
        [--holdout-docs 20] [--num 200] [--seed 1]

Writes `lambada_test.jsonl` (a LAMBADA-style passage, last word to predict: {"text"}) and
`choice.jsonl` (the next line of a passage among 4: the true one and 3 lines from elsewhere,
{"context", "choices", "gold"}). Score them with
`tools/evaluate.py --tasks-dir DIR --tasks lambada,choice --context-free-baseline`.
"""

from __future__ import annotations

import argparse
import json
import os
import random


def held_out_lines(path: str, holdout_docs: int) -> list[list[str]]:
    """The non-blank lines of the last `holdout_docs` documents, one list per document."""
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    return [[ln for ln in d.splitlines() if ln.strip()] for d in docs[-holdout_docs:]]


def make_tasks(docs: list[list[str]], num: int, seed: int, context_lines: int = 6):
    """(lambada rows, choice rows) drawn from `docs` with `random.Random(seed)`."""
    rnd = random.Random(seed)
    spots = [(d, i) for d, lines in enumerate(docs) for i in range(context_lines, len(lines))]
    every_line = [ln for lines in docs for ln in lines if len(ln.split()) >= 2]
    lambada, choice = [], []
    for d, i in rnd.sample(spots, min(num, len(spots))):
        context = "\n".join(docs[d][i - context_lines : i])
        line = docs[d][i]
        passage = f"{context}\n{line}".rstrip()
        if len(passage.split(" ")) >= 4 and passage.rsplit(" ", 1)[1].strip():
            lambada.append({"text": passage})
        others = rnd.sample([ln for ln in every_line if ln != line], 3)
        gold = rnd.randrange(4)
        choices = others[:gold] + [line] + others[gold:]
        choice.append({"context": context, "choices": ["\n" + c for c in choices], "gold": gold})
    return lambada, choice


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="The training corpus (.jsonl, {'text'}).")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--holdout-docs", type=int, default=20, help="Documents from the end.")
    p.add_argument("--num", type=int, default=200, help="Examples per task (at most).")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    lambada, choice = make_tasks(held_out_lines(args.input, args.holdout_docs), args.num, args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    for name, rows in (("lambada_test.jsonl", lambada), ("choice.jsonl", choice)):
        with open(os.path.join(args.output_dir, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{os.path.join(args.output_dir, name)}: {len(rows)} examples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
