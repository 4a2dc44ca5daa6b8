"""Decontamination: documents that share a 13-gram with an evaluation set (GPT-3, Brown et al. 2020,
appendix C), and the optional fastText classifier or language-ID model.

The evaluation sets are JSONL task files; each line's `--decontaminate-keys` fields (strings, or
lists of strings such as answer choices) are its text. Their 13-grams of normalised words are kept
as a sorted array of 64-bit hashes (small: evaluation sets are); a document's n-gram hashes are looked
up with one `searchsorted`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from megatron_lite.data.cleaning.text import ngram_hashes, word_hashes, words
from megatron_lite.data.corpus import BadLineError, iter_lines


def _texts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


class Decontaminator:
    """The n-grams of evaluation task files; `overlaps(word hashes)` counts a document's shared ones."""

    def __init__(self, paths: Sequence[str], keys: Sequence[str], n: int = 13) -> None:
        self.n, self.paths = n, list(paths)
        self.texts = self.short_texts = 0
        chunks = []
        for path, lineno, line in iter_lines(self.paths):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadLineError(path, lineno, f"malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise BadLineError(path, lineno, "expected a JSON object")
            for key in keys:
                for text in _texts(obj.get(key)):
                    ws = words(text)
                    self.texts += 1
                    if len(ws) < n:
                        self.short_texts += 1  # too short to hold an n-gram: not checkable
                    chunks.append(ngram_hashes(word_hashes(ws), n))
        if self.texts == 0:
            raise ValueError(
                f"--decontaminate {' '.join(self.paths)}: no text under the keys {list(keys)} "
                "(--decontaminate-keys)"
            )
        self.ngrams = np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, np.uint64)

    def overlaps(self, wh: np.ndarray) -> int:
        """How many of the document's n-grams (word hashes `wh`) occur in an evaluation set."""
        h = ngram_hashes(wh, self.n)
        if len(h) == 0 or len(self.ngrams) == 0:
            return 0
        i = np.searchsorted(self.ngrams, h).clip(max=len(self.ngrams) - 1)
        return int(np.count_nonzero(self.ngrams[i] == h))

    def describe(self) -> dict:
        return {
            "files": self.paths,
            "n": self.n,
            "texts": self.texts,
            "texts_shorter_than_n": self.short_texts,
            "distinct_ngrams": int(len(self.ngrams)),
        }


class FastTextFilter:
    """Keeps a document when a fastText model gives `label` at least `threshold` probability: a
    quality classifier (e.g. __label__hq) or a language-ID model (lid.176.bin with __label__en).
    The model loads lazily, once per process (fastText models do not pickle to workers)."""

    def __init__(self, path: str, label: str, threshold: float) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--fasttext-model {path}: no such file")
        self.path, self.label, self.threshold = path, label, threshold
        self._model = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None}

    def model(self):
        if self._model is None:
            import fasttext

            self._model = fasttext.load_model(self.path)
        return self._model

    def check_label(self) -> None:
        labels = self.model().get_labels()
        if self.label not in labels:
            raise ValueError(
                f"--fasttext-label {self.label}: not a label of --fasttext-model {self.path} "
                f"(it has {labels[:10]})"
            )

    def probability(self, text: str) -> float:
        labels, probs = self.model().predict(" ".join(text.split()), k=-1)  # one line, as trained
        return float(dict(zip(labels, probs)).get(self.label, 0.0))

    def keeps(self, text: str) -> bool:
        return self.probability(text) >= self.threshold
