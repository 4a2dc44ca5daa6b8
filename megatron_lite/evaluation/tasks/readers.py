"""Readers for the JSON-lines tasks: LAMBADA, HellaSwag, ARC, PIQA and plain text for perplexity.

Where the files come from (nothing is downloaded here; see the README's "Evaluating a model"):
LAMBADA `lambada_test.jsonl` (EleutherAI/lambada_openai, {"text"}); HellaSwag `hellaswag_val.jsonl`
(rowanz/hellaswag on GitHub: ctx_a, ctx_b, activity_label, endings, label); ARC `ARC-Easy-Test.jsonl`
(AI2's ARC-V1 release: question.stem, question.choices[].text/label, answerKey; the Hugging Face
export's flat question / choices.text / choices.label is read too); PIQA `valid.jsonl` with
`valid-labels.lst` beside it (ybisk/ybisk.github.io: goal, sol1, sol2; one label per line), or a
"label" field per line. Your own tasks: `choice` ({"context", "choices", "gold"} per line, see
tools/make_eval_tasks.py) and `perplexity` (documents).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator

from megatron_lite.evaluation.tasks.base import Doc, Task, TaskError


def read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """(where, object) for each non-blank line; `where` is "file:line". Malformed JSON, or a line
    that is not an object, raises TaskError naming file:line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(_lines(f, path), 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskError(
                    f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _lines(f, path: str) -> Iterator[bytes]:
    """The lines of a binary file; a truncated or corrupt .gz raises TaskError naming the file."""
    try:
        yield from f
    except (EOFError, OSError) as e:  # gzip.BadGzipFile is an OSError
        raise TaskError(f"{path}: cannot be read to the end ({e})") from None


def field(obj: dict, key: str, kind: type | tuple, where: str, what: str):
    """obj[key], checked to be of `kind`; else a TaskError saying what was expected."""
    if key not in obj:
        raise TaskError(f"{where}: expected a {key!r} field ({what}); found {sorted(obj)}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TaskError(f"{where}: {key!r} should be {what}, got {value!r}")
    return value


def _strings(obj: dict, key: str, where: str, n: int | None = None) -> list[str]:
    value = field(obj, key, list, where, "a list of strings")
    if not all(isinstance(v, str) for v in value) or (n is not None and len(value) != n):
        count = f"{n} strings" if n else "strings"
        raise TaskError(f"{where}: {key!r} should be a list of {count}, got {value!r}")
    return value


def _gold(value, n: int, where: str, key: str) -> int:
    try:
        gold = int(value)
    except (TypeError, ValueError):
        raise TaskError(f"{where}: {key!r} should be an answer index, got {value!r}") from None
    if not 0 <= gold < n:
        raise TaskError(f"{where}: {key!r} is {gold}, expected an index in [0, {n})")
    return gold


def read_lambada(path: str, name: str = "lambada") -> Task:
    """Last-word prediction: context = all but the last space-separated word."""
    docs = []
    for where, obj in read_jsonl(path):
        text = field(obj, "text", str, where, "a passage")
        if " " not in text.strip():
            raise TaskError(f"{where}: 'text' should have at least two words, got {text!r}")
        context, last = text.rsplit(" ", 1)
        docs.append(Doc(context=context, choices=[" " + last], delimiter="", text=text))
    return Task(name, "loglikelihood", _nonempty(docs, path))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def read_hellaswag(path: str, name: str = "hellaswag") -> Task:
    docs = []
    for where, obj in read_jsonl(path):
        ctx = field(obj, "ctx_a", str, where, "text") + " "
        ctx += field(obj, "ctx_b", str, where, "text").capitalize()
        label = field(obj, "activity_label", str, where, "text")
        endings = _strings(obj, "endings", where)
        gold = _gold(obj.get("label"), len(endings), where, "label")
        query = _hellaswag_clean(label + ": " + ctx)
        docs.append(Doc(query, [_hellaswag_clean(e) for e in endings], gold))
    return Task(name, "multiple_choice", _nonempty(docs, path))


def read_arc(path: str, name: str = "arc_easy") -> Task:
    docs = []
    for where, obj in read_jsonl(path):
        q = field(obj, "question", (str, dict), where, "a question")
        if isinstance(q, dict):  # AI2's release: {"stem", "choices": [{"text", "label"}]}
            stem = field(q, "stem", str, where, "the question text")
            choices = field(q, "choices", list, where, "a list of {text, label}")
            if not all(isinstance(c, dict) and "text" in c and "label" in c for c in choices):
                raise TaskError(f"{where}: question.choices should be {{text, label}} objects")
            texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
        else:  # the Hugging Face export: "choices": {"text": [...], "label": [...]}
            stem, choices = q, field(obj, "choices", dict, where, "{text: [...], label: [...]}")
            texts = _strings(choices, "text", where)
            labels = _strings(choices, "label", where, len(texts))
        key = field(obj, "answerKey", str, where, "the right choice's label")
        if key not in labels:
            raise TaskError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        docs.append(Doc(f"Question: {stem}\nAnswer:", texts, labels.index(key)))
    return Task(name, "multiple_choice", _nonempty(docs, path))


def _piqa_labels(path: str) -> list[str] | None:
    stem = path[: -len(".jsonl")] if path.endswith(".jsonl") else path
    labels = stem + "-labels.lst"
    if not os.path.exists(labels):
        return None
    with open(labels, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_piqa(path: str, name: str = "piqa") -> Task:
    labels, docs = _piqa_labels(path), []
    for i, (where, obj) in enumerate(read_jsonl(path)):
        goal = field(obj, "goal", str, where, "the goal text")
        sols = [field(obj, k, str, where, "a solution") for k in ("sol1", "sol2")]
        if "label" in obj:
            label = obj["label"]
        elif labels is not None and i < len(labels):
            label = labels[i]
        else:
            raise TaskError(
                f"{where}: no label: expected a 'label' field or line {i + 1} of "
                f"{path[: -len('.jsonl')]}-labels.lst"
            )
        docs.append(Doc(f"Question: {goal}\nAnswer:", sols, _gold(label, 2, where, "label")))
    return Task(name, "multiple_choice", _nonempty(docs, path))


def read_choice(path: str, name: str = "choice") -> Task:
    """A generic multiple-choice file, one {"context", "choices", "gold"} per line; each choice
    is scored as written right after the context (no delimiter: put one in the choices)."""
    docs = []
    for where, obj in read_jsonl(path):
        context = field(obj, "context", str, where, "the text before the choices")
        choices = _strings(obj, "choices", where)
        gold = _gold(
            field(obj, "gold", int, where, "the right choice's index"), len(choices), where, "gold"
        )
        docs.append(Doc(context, choices, gold, delimiter=""))
    return Task(name, "multiple_choice", _nonempty(docs, path))


def read_text(path: str, name: str = "perplexity") -> Task:
    """Documents for rolling log-likelihood: a .jsonl of {"text"} or a .txt (one document)."""
    if path.endswith((".jsonl", ".jsonl.gz", ".json")):
        texts = [field(o, "text", str, w, "a document") for w, o in read_jsonl(path)]
    else:
        with open(path, encoding="utf-8") as f:
            texts = [f.read()]
    docs = [Doc(text=t) for t in texts if t.strip()]
    return Task(name, "rolling", _nonempty(docs, path))


def _nonempty(docs: list[Doc], path: str) -> list[Doc]:
    if not docs:
        raise TaskError(f"{path}: no documents found")
    return docs
