"""MMLU (Hendrycks et al. 2021) from the release's CSV files: `data/{dev,test}/{subject}_{split}.csv`
(https://people.eecs.berkeley.edu/~hendrycks/data.tar; columns question, A, B, C, D, answer letter,
no header). Prompts as lm-eval's: a per-subject description, then the k few-shot examples drawn
(seeded) from that subject's dev split, then the question with its four lettered choices."""

from __future__ import annotations

import csv
import os

from megatron_lite.evaluation.tasks.base import Doc, Task, TaskError

LETTERS = ["A", "B", "C", "D"]


def _read_csv(path: str, subject: str) -> list[Doc]:
    docs = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            where = f"{path}:{lineno}"
            if len(row) != 6:
                raise TaskError(
                    f"{where}: expected 6 columns (question, A, B, C, D, answer letter), "
                    f"got {len(row)}"
                )
            if row[5].strip() not in LETTERS:
                raise TaskError(f"{where}: answer should be one of A B C D, got {row[5]!r}")
            q, *choices = row[:5]
            lettered = "".join(f"\n{k}. {c}" for k, c in zip(LETTERS, choices))
            context = f"{q.strip()}{lettered}\nAnswer:"
            gold = LETTERS.index(row[5].strip())
            docs.append(Doc(context, list(LETTERS), gold, extra={"group": subject}))
    return docs


def _subject_files(path: str, split: str) -> dict[str, str]:
    if os.path.isfile(path):
        return {os.path.basename(path).rsplit(f"_{split}.csv", 1)[0]: path}
    for d in (os.path.join(path, "data", split), os.path.join(path, split)):
        if os.path.isdir(d):
            names = sorted(n for n in os.listdir(d) if n.endswith(f"_{split}.csv"))
            return {n[: -len(f"_{split}.csv")]: os.path.join(d, n) for n in names}
    return {}


def read_mmlu(path: str, name: str = "mmlu") -> Task:
    """`path`: the release's directory (holding data/test and data/dev, or test and dev), or
    one `{subject}_test.csv` (its dev file then beside it, in ../dev)."""
    tests = _subject_files(path, "test")
    if not tests:
        raise TaskError(f"{path}: expected MMLU's test/{{subject}}_test.csv files under it")
    groups, pool = [], []
    for subject, file in tests.items():
        groups.append(_read_csv(file, subject))
        dev = os.path.join(os.path.dirname(os.path.dirname(file)), "dev", f"{subject}_dev.csv")
        if os.path.exists(dev):
            pool += _read_csv(dev, subject)
    subjects = {s: " ".join(s.split("_")) for s in tests}
    return Task(
        name,
        "multiple_choice",
        [d for g in groups for d in g],
        fewshot_pool=pool,
        description=lambda doc: (
            "The following are multiple choice questions (with answers) about "
            f"{subjects[doc.extra['group']]}.\n\n"
        ),
        groups=groups,
    )
