"""Quality heuristics as published for Gopher (MassiveText) and C4, in FineWeb's order.

Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
Gopher", appendix A.1.1 (quality filters) and table A1 (repetition thresholds). C4: Raffel et al.
2020, "Exploring the Limits of Transfer Learning ...", section 2.2 (and the TFDS implementation's
policy phrases). FineWeb (Penedo et al. 2024) runs Gopher repetition, Gopher quality, then C4; so
do we. Each Gopher rule is a signal with published bounds (`BOUNDS`); C4's are line and page
rules; `check` gives a document's first failure.

Words are whitespace-separated tokens (punctuation stripped where a length is measured); lines are
the non-blank lines; paragraphs are separated by blank lines.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

import numpy as np

from megatron_lite.data.cleaning.text import ngram_hashes, word_hashes

GROUPS = ("gopher_repetition", "gopher_quality", "c4")

# Gopher, appendix A.1.1
MIN_WORDS, MAX_WORDS = 50, 100_000
MIN_MEAN_WORD_LENGTH, MAX_MEAN_WORD_LENGTH = 3, 10
MAX_SYMBOL_WORD_RATIO = 0.1  # for "#" and for the ellipsis, each
MAX_BULLET_LINES = 0.9
MAX_ELLIPSIS_LINES = 0.3
MIN_ALPHA_WORDS = 0.8
STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
MIN_STOP_WORDS = 2
BULLETS = ("•", "-", "*", "‣", "⁃", "◦", "▪", "●", "○", "■", "□", "➢", "→")
ELLIPSES = ("...", "…")
# Gopher, table A1
MAX_DUP_LINE_FRACTION, MAX_DUP_PARAGRAPH_FRACTION = 0.30, 0.30
MAX_DUP_LINE_CHARS, MAX_DUP_PARAGRAPH_CHARS = 0.20, 0.20
MAX_TOP_NGRAM_CHARS = {2: 0.20, 3: 0.18, 4: 0.16}
MAX_DUP_NGRAM_CHARS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
# C4, section 2.2
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'")
MIN_LINE_WORDS = 3
MIN_SENTENCES = 5
POLICY_PHRASES = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")
_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")  # a whitespace token with a letter in it


@dataclass
class Cleaned:
    """A document after the heuristics: the first rule it failed (None: kept), its text (C4 removes
    lines), and the lines removed, by reason."""

    failed: str | None
    text: str
    removed_lines: dict[str, list[str]] = field(default_factory=dict)


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _dup_fractions(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
    seen, dup, dup_chars = set(), 0, 0
    for it in items:
        if it in seen:
            dup += 1
            dup_chars += len(it)
        seen.add(it)
    total_chars = sum(len(it) for it in items)
    return dup / max(len(items), 1), dup_chars / max(total_chars, 1)


def _ngram_char_fractions(ws: list[str]) -> dict[str, float]:
    """Gopher's n-gram repetition: characters of the most common n-gram (n = 2..4, times its
    count) and characters of words covered by repeated n-grams (n = 5..10, each word once), both
    over the characters of all words."""
    lengths = np.fromiter((len(w) for w in ws), dtype=np.int64, count=len(ws))
    total = max(int(lengths.sum()), 1)
    wh = word_hashes([w.lower() for w in ws])
    csum = np.concatenate([[0], np.cumsum(lengths)])
    out = {f"{n}gram": 0.0 for n in (*MAX_TOP_NGRAM_CHARS, *MAX_DUP_NGRAM_CHARS)}
    for n in MAX_TOP_NGRAM_CHARS:
        order, first = _sorted_groups(ngram_hashes(wh, n))
        counts = np.diff(np.r_[np.flatnonzero(first), len(order)])
        if len(counts) == 0 or counts.max() < 2:
            break  # no n-gram repeats: no longer one does either
        top = int(np.argmax(counts))
        i = int(order[np.flatnonzero(first)[top]])  # its first occurrence
        out[f"{n}gram"] = counts[top] * int(csum[i + n] - csum[i]) / total
    for n in MAX_DUP_NGRAM_CHARS:
        order, first = _sorted_groups(ngram_hashes(wh, n))
        repeat = order[~first]  # positions of every occurrence after the first
        if len(repeat) == 0:
            break
        diff = np.zeros(len(ws) + 1, dtype=np.int64)
        np.add.at(diff, repeat, 1)
        np.add.at(diff, repeat + n, -1)
        covered = np.cumsum(diff[:-1]) > 0
        out[f"{n}gram"] = int(lengths[covered].sum()) / total
    return out


def _sorted_groups(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions sorted by hash, stable; True where a new hash starts in that order)."""
    order = np.argsort(h, kind="stable")
    hs = h[order]
    return order, np.r_[True, hs[1:] != hs[:-1]] if len(hs) else np.zeros(0, bool)


# (lowest, highest) value of each signal a kept document may have; None: unbounded
BOUNDS = {
    "gopher_repetition": {
        "dup_line_fraction": (None, MAX_DUP_LINE_FRACTION),
        "dup_line_chars": (None, MAX_DUP_LINE_CHARS),
        "dup_paragraph_fraction": (None, MAX_DUP_PARAGRAPH_FRACTION),
        "dup_paragraph_chars": (None, MAX_DUP_PARAGRAPH_CHARS),
        **{f"top_{n}gram_chars": (None, v) for n, v in MAX_TOP_NGRAM_CHARS.items()},
        **{f"dup_{n}gram_chars": (None, v) for n, v in MAX_DUP_NGRAM_CHARS.items()},
    },
    "gopher_quality": {
        "word_count": (MIN_WORDS, MAX_WORDS),
        "mean_word_length": (MIN_MEAN_WORD_LENGTH, MAX_MEAN_WORD_LENGTH),
        "hash_symbol_ratio": (None, MAX_SYMBOL_WORD_RATIO),
        "ellipsis_symbol_ratio": (None, MAX_SYMBOL_WORD_RATIO),
        "bullet_lines": (None, MAX_BULLET_LINES),
        "ellipsis_lines": (None, MAX_ELLIPSIS_LINES),
        "alpha_words": (MIN_ALPHA_WORDS, None),
        "stop_words": (MIN_STOP_WORDS, None),
    },
}


def gopher_repetition_signals(text: str) -> dict[str, float]:
    lines = _lines(text)
    paragraphs = [p.strip() for p in _PARAGRAPH_SPLIT.split(text) if p.strip()]
    out = {}
    out["dup_line_fraction"], out["dup_line_chars"] = _dup_fractions(lines)
    out["dup_paragraph_fraction"], out["dup_paragraph_chars"] = _dup_fractions(paragraphs)
    for name, value in _ngram_char_fractions(text.split()).items():
        n = int(name.removesuffix("gram"))
        out[f"top_{n}gram_chars" if n in MAX_TOP_NGRAM_CHARS else f"dup_{n}gram_chars"] = value
    return out


def gopher_quality_signals(text: str) -> dict[str, float]:
    ws = text.split()
    n = max(len(ws), 1)
    stripped = [w.strip(string.punctuation) for w in ws]
    lengths = [len(w) for w in stripped if w]
    lines = _lines(text)
    n_lines = max(len(lines), 1)
    return {
        "word_count": len(ws),
        "mean_word_length": sum(lengths) / max(len(lengths), 1),
        "hash_symbol_ratio": text.count("#") / n,
        "ellipsis_symbol_ratio": sum(text.count(e) for e in ELLIPSES) / n,
        "bullet_lines": sum(ln.startswith(BULLETS) for ln in lines) / n_lines,
        "ellipsis_lines": sum(ln.endswith(ELLIPSES) for ln in lines) / n_lines,
        "alpha_words": len(_ALPHA_WORD.findall(text)) / n,
        "stop_words": sum(w.lower() in STOP_WORDS for w in stripped),
    }


SIGNALS = {"gopher_repetition": gopher_repetition_signals, "gopher_quality": gopher_quality_signals}


def first_failure(group: str, signals: dict[str, float]) -> str | None:
    """The first signal (in the papers' order) outside its bounds."""
    for name, (lo, hi) in BOUNDS[group].items():
        v = signals[name]
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return name
    return None


def c4_lines(text: str) -> tuple[str, dict[str, list[str]]]:
    """C4's line rules: keep lines that end in terminal punctuation, have at least 3 words, and
    mention neither javascript nor a cookie/privacy policy. (kept text, removed lines by reason)."""
    kept, removed = [], {}
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        low = s.lower()
        if not s.endswith(TERMINAL_PUNCTUATION) or s.endswith(ELLIPSES):
            reason = "no_terminal_punctuation"
        elif len(s.split()) < MIN_LINE_WORDS:
            reason = "short_line"
        elif "javascript" in low:
            reason = "javascript"
        elif any(p in low for p in POLICY_PHRASES):
            reason = "policy"
        else:
            kept.append(s)
            continue
        removed.setdefault(reason, []).append(s)
    return "\n".join(kept), removed


def c4_page(text: str) -> str | None:
    """C4's page rules on the page as it came: lorem ipsum and curly brackets drop it."""
    if "lorem ipsum" in text.lower():
        return "lorem_ipsum"
    if "{" in text:
        return "curly_bracket"
    return None


def check(text: str, groups: tuple[str, ...] = GROUPS) -> Cleaned:
    """Run the enabled groups in FineWeb's order; the first failure names `group.rule`."""
    for group, signals in SIGNALS.items():
        if group in groups and (failed := first_failure(group, signals(text))) is not None:
            return Cleaned(f"{group}.{failed}", text)
    if "c4" not in groups:
        return Cleaned(None, text)
    if (failed := c4_page(text)) is not None:
        return Cleaned(f"c4.{failed}", text)
    text, removed = c4_lines(text)
    if len(_SENTENCE_END.findall(text)) < MIN_SENTENCES:  # counted after the line rules
        return Cleaned("c4.too_few_sentences", text, removed)
    return Cleaned(None, text, removed)


def keyword_regex(words: list[str]) -> re.Pattern:
    """Whole words or phrases (any whitespace between their words), case-insensitive."""
    alternatives = (r"\s+".join(map(re.escape, w.split())) for w in words)
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE)


def read_keywords(path: str) -> list[str]:
    """One keyword (or phrase) per line; '#' starts a comment line."""
    with open(path, encoding="utf-8") as f:
        words = [w.strip() for w in f if w.strip() and not w.lstrip().startswith("#")]
    if not words:
        raise ValueError(f"--keywords {path}: no keywords in the file")
    return words
