"""A generated corpus with planted duplicates, for the tests and bench/bench_clean.py.

Documents are sentences of words drawn (Zipf-like) from a made-up vocabulary plus English stop words,
so they pass the Gopher and C4 rules. Planted: exact copies (re-spaced and re-cased, which
normalisation undoes), near copies (an original with `edit_rate` of its words substituted,
deleted or inserted) and related documents (an original's first `related_share` of words, then new
text: similar in part, not near duplicates, and they must stay).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

STOP = ["the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "is", "it"]


@dataclass
class Planted:
    exact: set[int] = field(default_factory=set)  # indices of exact copies (to drop)
    near: set[int] = field(default_factory=set)  # indices of edited copies (to drop)
    related: set[int] = field(default_factory=set)  # partial overlaps (to keep)


class CorpusGenerator:
    def __init__(self, seed: int = 0, vocab: int = 20000) -> None:
        self.rng = np.random.default_rng(seed)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        lengths = self.rng.integers(3, 10, size=vocab)
        self.vocab = ["".join(self.rng.choice(letters, n)) for n in lengths]
        p = 1.0 / np.arange(1, vocab + 1) ** 0.8
        self.p = p / p.sum()

    def words(self, n: int) -> list[str]:
        ids = self.rng.choice(len(self.vocab), size=n, p=self.p)
        out = [self.vocab[i] for i in ids]
        for pos in self.rng.choice(n, size=n // 6, replace=False):
            out[pos] = STOP[pos % len(STOP)]
        return out

    @staticmethod
    def text(ws: list[str], sentence: int = 12) -> str:
        sentences = [" ".join(ws[i : i + sentence]) for i in range(0, len(ws), sentence)]
        lines = [s[0].upper() + s[1:] + "." for s in sentences]
        return "\n".join(" ".join(lines[i : i + 3]) for i in range(0, len(lines), 3))

    def edit(self, ws: list[str], rate: float) -> list[str]:
        out = []
        for w in ws:
            r = self.rng.random()
            if r < rate / 3:
                continue  # deleted
            if r < 2 * rate / 3:
                out.append(self.vocab[self.rng.integers(len(self.vocab))])  # substituted
                continue
            out.append(w)
            if r < rate:
                out.append(self.vocab[self.rng.integers(len(self.vocab))])  # inserted
        return out

    def documents(
        self,
        n: int,
        near: float = 0.1,
        exact: float = 0.05,
        related: float = 0.05,
        edit_rate: float = 0.03,
        related_share: float = 0.3,
        length: tuple[int, int] = (150, 400),
        planted: Planted | None = None,
    ) -> Iterator[str]:
        """`n` JSONL lines; shares of them are planted copies of earlier originals (recorded in
        `planted`). Only the last 64 originals are remembered: memory stays flat for any `n`."""
        originals: list[list[str]] = []
        for i in range(n):
            r = self.rng.random()
            if originals and r < near + exact + related:
                src = originals[self.rng.integers(len(originals))]
                if r < near:
                    ws, kind = self.edit(src, edit_rate), "near"
                elif r < near + exact:
                    ws, kind = src, "exact"
                else:
                    k = int(len(src) * related_share)
                    ws, kind = src[:k] + self.words(len(src) - k), "related"
                text = self.text(ws)
                if kind == "exact":
                    text = "  " + text.upper().replace(" ", "   ") + "\n"
                if planted is not None:
                    getattr(planted, kind).add(i)
            else:
                ws = self.words(int(self.rng.integers(*length)))
                originals = (originals + [ws])[-64:]
                text = self.text(ws)
            yield json.dumps({"text": text, "id": i}) + "\n"
