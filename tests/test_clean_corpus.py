"""tools/clean_corpus.py and megatron_lite/data/cleaning: what each rule drops, near-dup recall and
precision on planted edited copies, decontamination, fastText, shards, and clean failures."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data.cleaning import (
    FilterConfig,
    MinHasher,
    clean,
    finish,
    scan_shard,
)
from megatron_lite.data.cleaning import heuristics as H
from megatron_lite.data.cleaning.scan import bounded_imap
from megatron_lite.data.cleaning.synthetic import CorpusGenerator, Planted

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "clean_corpus.py"


def run_tool(*args, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    if check_rc is not None:
        assert out.returncode == check_rc, out.stdout + out.stderr
    return out


def write_jsonl(path: Path, texts: list[str], **extra) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "id": i, **extra}) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def good_text(seed: int = 0, n: int = 240) -> str:
    g = CorpusGenerator(seed)
    return g.text(g.words(n))


def dedup_only(threshold: float = 0.7, shingle: int = 5) -> FilterConfig:
    return FilterConfig(groups=(), minhasher=MinHasher(128, shingle), threshold=threshold)


# ---------------------------------------------------------------- near and exact duplicates


def test_near_duplicates_of_planted_edited_copies_found_with_recall_and_precision_095(tmp_path):
    planted, n = Planted(), 1500
    corpus = tmp_path / "gen.jsonl"
    docs = CorpusGenerator(seed=3).documents(n, edit_rate=0.02, planted=planted)
    corpus.write_text("".join(docs))
    report = clean([str(corpus)], str(tmp_path / "out"), dedup_only(0.7))
    kept = {d["id"] for d in read_jsonl(tmp_path / "out" / "gen.jsonl")}
    dropped = set(range(n)) - kept
    near = dropped - planted.exact
    found = near & planted.near
    recall, precision = len(found) / len(planted.near), len(found) / len(near)
    assert len(planted.near) > 100 and len(planted.related) > 50
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)
    assert planted.exact <= dropped  # every re-spaced, re-cased copy
    assert planted.related <= kept  # 30% shared, then different: not a near duplicate
    st = report["stats"]
    # an edited copy that drew no edit is an exact copy: counted there
    assert st["dropped"]["near_duplicate"] + st["dropped"]["exact_duplicate"] == len(dropped)
    assert st["dropped"]["exact_duplicate"] >= len(planted.exact)
    ex = st["examples"]["near_duplicate"][0]
    assert ex["at"].startswith(str(corpus)) and ex["duplicate_of"].startswith(str(corpus))


def test_exact_duplicates_are_found_across_input_files(tmp_path):
    a, b = good_text(1), good_text(2)
    f1 = write_jsonl(tmp_path / "one.jsonl", [a, b])
    f2 = write_jsonl(tmp_path / "two.jsonl.gz", ["  " + b.upper() + "\n\n", good_text(3)])
    report = clean([str(f1), str(f2)], str(tmp_path / "out"), dedup_only())
    assert [d["id"] for d in read_jsonl(tmp_path / "out" / "one.jsonl")] == [0, 1]
    assert [d["id"] for d in read_jsonl(tmp_path / "out" / "two.jsonl.gz")] == [1]
    [ex] = report["stats"]["examples"]["exact_duplicate"]
    assert ex["at"] == f"{f2}:1" and ex["duplicate_of"] == f"{f1}:2"


def test_two_workers_and_three_shards_give_the_same_output_as_one_process(tmp_path):
    inputs = []
    gen = CorpusGenerator(seed=5)
    docs = list(gen.documents(600, edit_rate=0.02))
    for k in range(3):
        (tmp_path / f"part{k}.jsonl").write_text("".join(docs[k::3]))
        inputs.append(str(tmp_path / f"part{k}.jsonl"))
    cfg = dedup_only()
    one = clean(inputs, str(tmp_path / "one"), cfg)
    two = clean(inputs, str(tmp_path / "two"), cfg, workers=2)
    work = tmp_path / "work"
    for shard in range(3):
        scan_shard(inputs, shard, 3, str(work), cfg)
    sharded = finish(str(work), str(tmp_path / "sharded"))
    for k in range(3):
        want = (tmp_path / "one" / f"part{k}.jsonl").read_bytes()
        assert (tmp_path / "two" / f"part{k}.jsonl").read_bytes() == want
        assert (tmp_path / "sharded" / f"part{k}.jsonl").read_bytes() == want
    assert one["stats"]["dropped"] == two["stats"]["dropped"] == sharded["stats"]["dropped"]
    assert one["stats"]["dropped"]["near_duplicate"] > 20  # duplicates across the files, too


def test_bounded_imap_keeps_a_window_of_tasks_in_flight():
    consumed = []

    class Pool:  # runs each task at once; only the reading-ahead matters here
        def apply_async(self, fn, args):
            class Done:
                def get(self_inner):
                    return fn(*args)

            return Done()

    def tasks():
        for i in range(100):
            consumed.append(i)
            yield i

    it = bounded_imap(Pool(), lambda x: x * 2, tasks(), window=4)
    assert [next(it) for _ in range(3)] == [0, 2, 4]
    assert len(consumed) == 6  # 3 returned + at most `window - 1` ahead
    assert list(it)[-1] == 198


# ---------------------------------------------------------------- heuristics: trip and pass


def uniq(n: int, start: int = 0) -> list[str]:
    """n distinct 5-letter words."""
    return ["".join(chr(97 + (i // 26**k) % 26) for k in range(5)) for i in range(start, start + n)]


def lines_doc(lines: list[str]) -> str:
    return "\n".join(lines)


UNIQUE_LINES = [" ".join(uniq(6, 6 * i)) + "." for i in range(10)]
PARAGRAPHS = ["\n".join(" ".join(uniq(6, 60 * p + 6 * i)) for i in range(10)) for p in range(10)]

# rule: (a document that trips it, one that passes it); signals of gopher_{repetition,quality}
REPETITION = {
    "dup_line_fraction": (
        lines_doc(UNIQUE_LINES + ["same line here."] * 6),  # 5 of 16 lines repeat: 0.31
        lines_doc(UNIQUE_LINES + ["same line here."] * 5),  # 4 of 15: 0.27
    ),
    "dup_line_chars": (
        lines_doc(UNIQUE_LINES + [" ".join(uniq(40, 900))] * 2),
        lines_doc(UNIQUE_LINES + [" ".join(uniq(40, 900))]),
    ),
    "dup_paragraph_fraction": (
        "\n\n".join(PARAGRAPHS + ["tiny para"] * 6),  # 5 of 16 paragraphs repeat
        "\n\n".join(PARAGRAPHS + ["tiny para"] * 5),
    ),
    "dup_paragraph_chars": (
        "\n\n".join(PARAGRAPHS[:2] + [PARAGRAPHS[3]] * 2),  # 1 of 4 repeats: 0.25 of the chars
        "\n\n".join(PARAGRAPHS[:5]),
    ),
    "top_2gram_chars": (
        " ".join(uniq(100) + ["abcde", "fghij"] * 20),
        " ".join(uniq(100) + ["abcde", "fghij"] * 8),
    ),
    "top_3gram_chars": (
        " ".join(uniq(100) + ["abcde", "fghij", "klmno"] * 12),
        " ".join(uniq(100) + ["abcde", "fghij", "klmno"] * 4),
    ),
    "top_4gram_chars": (
        " ".join(uniq(100) + ["abcde", "fghij", "klmno", "pqrst"] * 10),
        " ".join(uniq(100) + ["abcde", "fghij", "klmno", "pqrst"] * 3),
    ),
    **{
        f"dup_{n}gram_chars": (
            " ".join(uniq(50) + uniq(30, 500) + uniq(50, 50) + uniq(30, 500)),  # 30 words twice
            " ".join(uniq(50) + uniq(10, 500) + uniq(50, 50) + uniq(10, 500)),  # 10 words twice
        )
        for n in range(5, 11)
    },
}
BASE = good_text(7)
BASE_WORDS = BASE.split()
QUALITY = {
    "word_count": (" ".join(BASE_WORDS[:49]), " ".join(BASE_WORDS[:50])),
    "mean_word_length": (
        " ".join(["a", "to", "it", "be", "the"] * 20),
        " ".join(["abc", "tome", "item", "bee", "the"] * 20),
    ),
    "hash_symbol_ratio": (
        " ".join(BASE_WORDS[:200] + ["#tag"] * 24),  # 24 / 224 words
        " ".join(BASE_WORDS[:200] + ["#tag"] * 20),  # 20 / 220
    ),
    "ellipsis_symbol_ratio": (
        " ".join(BASE_WORDS[:200] + ["so..."] * 24),
        " ".join(BASE_WORDS[:200] + ["so..."] * 20),
    ),
    "bullet_lines": (
        lines_doc(["• " + ln for ln in UNIQUE_LINES]),  # every line
        lines_doc(["• " + ln for ln in UNIQUE_LINES[:9]] + UNIQUE_LINES[9:]),  # 9 of 10
    ),
    "ellipsis_lines": (
        lines_doc([ln[:-1] + "..." for ln in UNIQUE_LINES[:4]] + UNIQUE_LINES[4:]),  # 4 of 10
        lines_doc([ln[:-1] + "..." for ln in UNIQUE_LINES[:3]] + UNIQUE_LINES[3:]),  # 3 of 10
    ),
    "alpha_words": (
        " ".join(BASE_WORDS[:150] + ["1234"] * 50),  # 75% of the words have a letter
        " ".join(BASE_WORDS[:170] + ["1234"] * 30),  # 85%
    ),
    "stop_words": (" ".join(uniq(60) + ["the"]), " ".join(uniq(60) + ["the", "with"])),
}
CASES = [("gopher_repetition", r, *c) for r, c in REPETITION.items()]
CASES += [("gopher_quality", r, *c) for r, c in QUALITY.items()]


def test_the_base_document_passes_every_rule():
    assert H.check(BASE).failed is None
    assert H.check(BASE).text == BASE  # every line ends a sentence: nothing removed


@pytest.mark.parametrize("group, rule, trips, passes", CASES, ids=[c[1] for c in CASES])
def test_gopher_rule_trips_past_its_published_threshold_and_passes_below(
    group, rule, trips, passes
):
    lo, hi = H.BOUNDS[group][rule]
    bad, good = H.SIGNALS[group](trips)[rule], H.SIGNALS[group](passes)[rule]
    assert (lo is not None and bad < lo) or (hi is not None and bad > hi), (rule, bad)
    assert (lo is None or good >= lo) and (hi is None or good <= hi), (rule, good)


def test_gopher_word_count_trips_above_100000_words():
    assert H.gopher_quality_signals("word " * 100_001)["word_count"] > H.MAX_WORDS
    assert H.check("word " * 100_001, ("gopher_quality",)).failed == "gopher_quality.word_count"


def test_gopher_rules_name_the_first_failure_in_the_papers_order():
    assert H.check(QUALITY["stop_words"][0]).failed == "gopher_quality.stop_words"
    assert H.check(REPETITION["top_2gram_chars"][0]).failed == "gopher_repetition.top_2gram_chars"
    dup_lines = REPETITION["dup_line_fraction"][0]
    assert H.check(dup_lines).failed == "gopher_repetition.dup_line_fraction"
    assert (
        H.check(dup_lines, ("gopher_quality", "c4")).failed != "gopher_repetition.dup_line_fraction"
    )


C4_LINES = {  # reason: a line it removes
    "no_terminal_punctuation": "This line has no full stop at the end",
    "short_line": "Too short.",
    "javascript": "Please enable JavaScript to view this page.",
    "policy": "By using this site you agree to our privacy policy.",
}


@pytest.mark.parametrize("reason, line", C4_LINES.items(), ids=C4_LINES.keys())
def test_c4_line_rule_removes_its_lines_and_keeps_good_ones(reason, line):
    good = "This sentence is fine and stays in the page."
    text, removed = H.c4_lines(f"{good}\n{line}\n{good}")
    assert removed == {reason: [line]}
    assert text == f"{good}\n{good}"


@pytest.mark.parametrize(
    "rule, page",
    [
        ("lorem_ipsum", BASE + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."),
        ("curly_bracket", BASE + "\nThe dict {a: 1} is here."),
        (
            "too_few_sentences",
            "\n".join(f"Sentence {i} " + " ".join(uniq(14, 20 * i)) + "." for i in range(4)),
        ),
    ],
)
def test_c4_page_rule_drops_its_pages(rule, page):
    assert H.check(page, ("c4",)).failed == f"c4.{rule}"
    assert H.check(BASE, ("c4",)).failed is None


def test_c4_lines_without_terminal_punctuation_are_removed_from_kept_documents(tmp_path):
    text = BASE + "\nShare this page on social media"
    f = write_jsonl(tmp_path / "c.jsonl", [text], source="web")
    report = clean([str(f)], str(tmp_path / "out"), FilterConfig())
    [doc] = read_jsonl(tmp_path / "out" / "c.jsonl")
    assert doc == {"text": BASE, "id": 0, "source": "web"}  # other fields stay
    assert report["stats"]["lines_removed"] == {"c4.line.no_terminal_punctuation": 1}
    ex = report["stats"]["examples"]["c4.line.no_terminal_punctuation"][0]
    assert ex["text"] == "Share this page on social media"


# ---------------------------------------------------------------- keywords, fastText, decontamination


def test_keyword_list_drops_whole_word_matches_and_reports_them(tmp_path):
    words = tmp_path / "blocked.txt"
    words.write_text("# one per line\nzorblax\nbad phrase\n")
    texts = [BASE + " Zorblax.", BASE + " Zorblaxes.", BASE + " A bad  phrase.", good_text(8)]
    f = write_jsonl(tmp_path / "k.jsonl", texts)
    out = run_tool("--input", f, "--output-dir", tmp_path / "out", "--keywords", words)
    assert [d["id"] for d in read_jsonl(tmp_path / "out" / "k.jsonl")] == [1, 3]
    assert "keywords.blocked.txt" in out.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stats"]["dropped"] == {"keywords.blocked.txt": 2}


def _fasttext_model(tmp_path: Path) -> Path:
    fasttext = pytest.importorskip("fasttext")
    gen, lines = CorpusGenerator(seed=11), []
    for _ in range(200):
        lines.append("__label__hq " + " ".join(gen.words(30)))
        lines.append("__label__lq " + " ".join(["buy", "cheap", "click", "now", "free"] * 6))
    train = tmp_path / "train.txt"
    train.write_text("\n".join(lines) + "\n")
    model = fasttext.train_supervised(str(train), epoch=5, lr=0.5, thread=1, seed=1, verbose=0)
    model.save_model(str(tmp_path / "quality.bin"))
    return tmp_path / "quality.bin"


def test_fasttext_classifier_keeps_the_label_it_is_given(tmp_path):
    model = _fasttext_model(tmp_path)
    spam = " ".join(["Buy cheap pills now.", "Click here for free money."] * 40)
    f = write_jsonl(tmp_path / "f.jsonl", [BASE, spam, good_text(9)])
    args = ["--input", f, "--output-dir", tmp_path / "out", "--heuristics"]
    args += ["--fasttext-model", model, "--fasttext-label", "__label__hq", "--workers", "2"]
    run_tool(*args)
    assert [d["id"] for d in read_jsonl(tmp_path / "out" / "f.jsonl")] == [0, 2]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stats"]["dropped"] == {"fasttext.__label__hq": 1}
    bad = run_tool(*args[:-4], "--fasttext-label", "__label__en", check_rc=2)
    assert "--fasttext-label __label__en: not a label of --fasttext-model" in bad.stderr


def test_documents_sharing_a_13gram_with_an_evaluation_set_are_dropped(tmp_path):
    question = " ".join(uniq(20, 3000))
    evals = write_jsonl(tmp_path / "task.jsonl", [], question=question)
    evals.write_text(json.dumps({"question": question, "choices": ["x y", "z"]}) + "\n")
    overlap13 = good_text(21) + " " + " ".join(question.split()[3:16]) + "."
    overlap12 = good_text(22) + " " + " ".join(question.split()[3:15]) + "."
    f = write_jsonl(tmp_path / "d.jsonl", [overlap13, overlap12])
    args = ["--input", f, "--heuristics", "--decontaminate", evals]
    args += ["--decontaminate-keys", "question", "choices"]
    run_tool(*args, "--output-dir", tmp_path / "drop")
    assert [d["id"] for d in read_jsonl(tmp_path / "drop" / "d.jsonl")] == [1]
    report = json.loads((tmp_path / "drop" / "report.json").read_text())
    assert report["stats"]["dropped"] == {"decontamination": 1}
    assert report["decontamination"]["texts_shorter_than_n"] == 2  # the two choices
    assert report["stats"]["examples"]["decontamination"][0]["overlapping_ngrams"] == 1
    run_tool(*args, "--decontaminate-action", "report", "--output-dir", tmp_path / "keep")
    report = json.loads((tmp_path / "keep" / "report.json").read_text())
    assert len(read_jsonl(tmp_path / "keep" / "d.jsonl")) == 2
    assert report["decontamination"]["documents_overlapping"] == 1


# ---------------------------------------------------------------- bad input, atomic outputs


def test_malformed_line_names_file_and_line_and_leaves_no_output(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [BASE, good_text(4)])
    with open(f, "a") as fh:
        fh.write('{"text": "unterminated\n')
    out = run_tool("--input", f, "--output-dir", tmp_path / "out", check_rc=1)
    assert f"{f}:3: malformed JSON" in out.stderr and "no output written" in out.stderr
    assert list((tmp_path / "out").iterdir()) == []
    run_tool("--input", f, "--output-dir", tmp_path / "out", "--skip-bad-lines")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stats"]["bad_lines"] == 1 and report["stats"]["kept"] == 2


def test_truncated_gzip_names_the_file_and_leaves_no_output(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl.gz", [BASE])
    f = write_jsonl(tmp_path / "cut.jsonl.gz", [f"{BASE} Number {i}." for i in range(30)])
    f.write_bytes(f.read_bytes()[:-200])
    out = run_tool("--input", good, f, "--output-dir", tmp_path / "out", check_rc=1)
    assert f"{f}: truncated or corrupt gzip file" in out.stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--fasttext-model", "{tmp}/none.bin"], "--fasttext-model {tmp}/none.bin: no such file"),
        (["--keywords", "{tmp}/none.txt"], "--keywords {tmp}/none.txt: no such file"),
        (["--decontaminate", "{tmp}/none.jsonl"], "--decontaminate {tmp}/none.jsonl: no such file"),
        (["--jaccard-threshold", "1.5"], "--jaccard-threshold must be in (0, 1), got 1.5"),
        (["--workers", "0"], "--workers must be at least 1, got 0"),
    ],
)
def test_bad_flags_fail_at_once_naming_the_flag(flags, message, tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [BASE])
    flags = [a.format(tmp=tmp_path) for a in flags]
    out = run_tool("--input", f, "--output-dir", tmp_path / "out", *flags, check_rc=2)
    assert message.format(tmp=tmp_path) in out.stderr


def test_dedup_stage_names_the_shards_that_were_not_scanned(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [BASE])
    g = write_jsonl(tmp_path / "b.jsonl", [good_text(5)])
    work = tmp_path / "work"
    run_tool(
        "--input",
        f,
        g,
        "--stage",
        "scan",
        "--num-shards",
        "2",
        "--shard-index",
        "1",
        "--work-dir",
        work,
    )
    out = run_tool(
        "--stage", "dedup", "--work-dir", work, "--output-dir", tmp_path / "out", check_rc=1
    )
    assert "shards [0] of 2 have no manifest" in out.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_minhash_agreement_estimates_jaccard():
    mh, gen = MinHasher(256, 3), CorpusGenerator(seed=2)
    from megatron_lite.data.cleaning.text import ngram_hashes, word_hashes, words

    a = words(" ".join(gen.words(400)))
    b = a[:300] + words(" ".join(gen.words(100)))
    sa, sb = (set(ngram_hashes(word_hashes(x), 3).tolist()) for x in (a, b))
    true = len(sa & sb) / len(sa | sb)
    est = float(np.mean(mh.signature(word_hashes(a)) == mh.signature(word_hashes(b))))
    assert abs(est - true) < 0.08, (est, true)


def test_an_output_that_is_or_links_to_an_input_is_refused_and_the_input_kept(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    import clean_corpus

    d = tmp_path / "d"
    d.mkdir()
    f = write_jsonl(d / "a.jsonl", [BASE, BASE])
    before = f.read_bytes()
    (tmp_path / "alias").symlink_to(d)  # the same directory by another name
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "a.jsonl").symlink_to(f)  # the output name links to the input
    for out in (d, tmp_path / "alias", tmp_path / "links"):
        with pytest.raises(SystemExit) as e:
            clean_corpus.main(["--input", str(f), "--output-dir", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"would overwrite the input {f}" in err and f"--output-dir {out}" in err, err
    # the dedup stage reads its inputs from the shards' manifests: refused there as well
    work = tmp_path / "work"
    assert clean_corpus.main(["--input", str(f), "--stage", "scan", "--work-dir", str(work)]) == 0
    assert clean_corpus.main(["--stage", "dedup", "--work-dir", str(work), "--output-dir", str(d)])
    assert "would overwrite the input" in capsys.readouterr().err
    assert f.read_bytes() == before and sorted(p.name for p in d.iterdir()) == ["a.jsonl"]


def test_invalid_utf8_names_file_and_line_and_leaves_no_output(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    import clean_corpus

    f = write_jsonl(tmp_path / "u.jsonl", [BASE])
    with open(f, "ab") as fh:
        fh.write(b'{"text": "bad \xff\xfe here"}\n')
    assert clean_corpus.main(["--input", str(f), "--output-dir", str(tmp_path / "out")]) == 1
    assert f"{f}:2: not valid UTF-8 (byte 0xff" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []
