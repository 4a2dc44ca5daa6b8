"""One document through the filters, in a worker: heuristics, keywords, fastText, decontamination,
then its exact key, MinHash signature and LSH band keys (what the dedup pass needs, nothing else)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from megatron_lite.data.cleaning import heuristics
from megatron_lite.data.cleaning.decontaminate import Decontaminator, FastTextFilter
from megatron_lite.data.cleaning.minhash import MinHasher, band_keys, lsh_params
from megatron_lite.data.cleaning.text import exact_key, word_hashes, words
from megatron_lite.data.corpus import BadLineError, parse_json_line


@dataclass
class FilterConfig:
    """Everything a worker needs (picklable; regexes and models are built in the worker)."""

    text_key: str = "text"
    groups: tuple[str, ...] = heuristics.GROUPS
    keywords: dict[str, list[str]] = field(default_factory=dict)  # list name -> words
    fasttext: FastTextFilter | None = None
    decontaminator: Decontaminator | None = None
    decontaminate_action: str = "drop"  # or "report"
    minhasher: MinHasher = field(default_factory=MinHasher)
    threshold: float = 0.8  # Jaccard similarity that makes a near duplicate
    bands: int | None = None  # LSH banding; None: lsh_params(threshold, num_perm)
    rows: int | None = None

    def __post_init__(self) -> None:
        if self.bands is None or self.rows is None:
            self.bands, self.rows = lsh_params(self.threshold, self.minhasher.num_perm)

    def lsh(self) -> dict:
        m = self.minhasher
        return {
            "num_perm": m.num_perm,
            "shingle_size": m.shingle_size,
            "seed": m.seed,
            "threshold": self.threshold,
            "bands": self.bands,
            "rows": self.rows,
        }


@dataclass
class Result:
    """A line's fate: status "bad" (payload: reason), "drop" (rule) or "keep"."""

    path: str
    lineno: int
    nbytes: int
    status: str
    rule: str = ""
    text: str = ""  # the (cleaned) text, for examples
    line: str = ""  # the output JSONL line (kept documents)
    exact: int = 0
    signature: np.ndarray | None = None
    bands: np.ndarray | None = None
    removed_lines: dict[str, list[str]] = field(default_factory=dict)
    overlaps: int = 0


class DocumentFilter:
    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        self.keyword_res = {n: heuristics.keyword_regex(w) for n, w in cfg.keywords.items()}

    def _rule(self, text: str) -> tuple[str | None, heuristics.Cleaned]:
        cleaned = heuristics.check(text, self.cfg.groups)
        if cleaned.failed is not None:
            return cleaned.failed, cleaned
        for name, regex in self.keyword_res.items():
            if regex.search(cleaned.text):
                return f"keywords.{name}", cleaned
        if self.cfg.fasttext is not None and not self.cfg.fasttext.keeps(cleaned.text):
            return f"fasttext.{self.cfg.fasttext.label}", cleaned
        return None, cleaned

    def __call__(self, path: str, lineno: int, line: str) -> Result:
        nbytes = len(line.encode("utf-8", "surrogateescape"))  # the bytes as read, UTF-8 or not
        try:
            fields = parse_json_line(line, [self.cfg.text_key], path, lineno)
        except BadLineError as e:
            return Result(path, lineno, nbytes, "bad", rule=e.reason)
        text = fields[self.cfg.text_key]
        failed, cleaned = self._rule(text)
        if failed is not None:
            return Result(path, lineno, nbytes, "drop", failed, cleaned.text)
        wh = word_hashes(words(cleaned.text))
        overlaps = 0
        if self.cfg.decontaminator is not None:
            overlaps = self.cfg.decontaminator.overlaps(wh)
            if overlaps and self.cfg.decontaminate_action == "drop":
                r = Result(path, lineno, nbytes, "drop", "decontamination", cleaned.text)
                r.overlaps = overlaps
                return r
        if cleaned.text != text:  # C4 removed lines: the other fields stay as they were
            obj = json.loads(line)
            obj[self.cfg.text_key] = cleaned.text
            line = json.dumps(obj, ensure_ascii=False) + "\n"
        elif not line.endswith("\n"):
            line += "\n"
        sig = self.cfg.minhasher.signature(wh)
        return Result(
            path,
            lineno,
            nbytes,
            "keep",
            line=line,
            exact=exact_key(cleaned.text),
            signature=sig,
            bands=band_keys(sig, self.cfg.bands, self.cfg.rows),
            removed_lines=cleaned.removed_lines,
            overlaps=overlaps,
        )


_filter: DocumentFilter | None = None


def init_worker(cfg: FilterConfig) -> None:
    global _filter
    _filter = DocumentFilter(cfg)


def filter_batch(batch: list[tuple[str, int, str]]) -> list[Result]:
    return [_filter(*item) for item in batch]
