"""What each rule dropped: counts and a few examples, merged across workers and shards."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

SNIPPET = 160  # characters of an example


def snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET else flat[: SNIPPET - 3] + "..."


@dataclass
class RuleStats:
    """Documents dropped per rule (and lines removed per C4 line rule), with `max_examples` each."""

    max_examples: int = 3
    dropped: Counter = field(default_factory=Counter)
    lines_removed: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    read: int = 0
    kept: int = 0
    bad_lines: int = 0
    bytes_read: int = 0
    bytes_kept: int = 0

    def drop(self, rule: str, where: str, text: str, **extra) -> None:
        self.dropped[rule] += 1
        self.example(rule, where, text, **extra)

    def example(self, rule: str, where: str, text: str, **extra) -> None:
        ex = self.examples.setdefault(rule, [])
        if len(ex) < self.max_examples:
            ex.append({"at": where, "text": snippet(text), **extra})

    def merge(self, other: RuleStats) -> None:
        self.dropped.update(other.dropped)
        self.lines_removed.update(other.lines_removed)
        for rule, ex in other.examples.items():
            mine = self.examples.setdefault(rule, [])
            mine.extend(ex[: max(0, self.max_examples - len(mine))])
        for name in ("read", "kept", "bad_lines", "bytes_read", "bytes_kept"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "bad_lines": self.bad_lines,
            "bytes_read": self.bytes_read,
            "bytes_kept": self.bytes_kept,
            "dropped": dict(sorted(self.dropped.items())),
            "lines_removed": dict(sorted(self.lines_removed.items())),
            "examples": dict(sorted(self.examples.items())),
        }

    @classmethod
    def from_dict(cls, d: dict, max_examples: int = 3) -> RuleStats:
        s = cls(max_examples)
        s.dropped.update(d["dropped"])
        s.lines_removed.update(d["lines_removed"])
        s.examples = {k: list(v) for k, v in d["examples"].items()}
        for name in ("read", "kept", "bad_lines", "bytes_read", "bytes_kept"):
            setattr(s, name, d[name])
        return s


def summary(report: dict) -> str:
    """The human-readable report: totals, then one line per rule (share of documents read)."""
    st = report["stats"]
    read = max(st["read"], 1)
    lines = [
        f"clean_corpus: {st['read']:,} documents read ({st['bytes_read'] / 2**20:.2f} MiB), "
        f"{st['kept']:,} kept ({100 * st['kept'] / read:.1f}%, {st['bytes_kept'] / 2**20:.2f} MiB)"
        f", {st['bad_lines']} bad lines skipped",
        f"  near-dup LSH: {report['lsh']['bands']} bands x {report['lsh']['rows']} rows of "
        f"{report['lsh']['num_perm']} permutations, Jaccard >= {report['lsh']['threshold']}, "
        f"{report['lsh']['shingle_size']}-word shingles",
        "  documents dropped by rule:",
    ]
    for rule, n in sorted(st["dropped"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {rule:42s} {n:9,d}  {100 * n / read:5.1f}%")
        for ex in st["examples"].get(rule, [])[:1]:
            of = f" (a copy of {ex['duplicate_of']})" if "duplicate_of" in ex else ""
            lines.append(f"      e.g. {ex['at']}{of}: {ex['text'][:80]}")
    if st["lines_removed"]:
        lines.append("  lines removed inside kept documents (C4 line rules):")
        for rule, n in sorted(st["lines_removed"].items(), key=lambda kv: -kv[1]):
            lines.append(f"    {rule:42s} {n:9,d}")
    if report.get("decontamination"):
        d = report["decontamination"]
        lines.append(
            f"  decontamination: {d['distinct_ngrams']:,} distinct {d['n']}-grams from "
            f"{d['texts']:,} evaluation texts ({d['texts_shorter_than_n']} shorter than {d['n']} "
            f"words), action {d['action']}, {d['documents_overlapping']:,} documents overlap"
        )
    lines.append(f"  {report['seconds']:.1f} s; outputs: {', '.join(report['outputs'])}")
    return "\n".join(lines)


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_atomically(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")
