"""Clean a JSONL corpus: exact and near-duplicate removal, Gopher/C4 quality rules, keyword lists,
an optional fastText classifier, decontamination against evaluation sets; JSONL(.gz) in, the same
out (one cleaned file per input, same name), plus report.json and report.txt.

    python tools/clean_corpus.py --input data/*.jsonl.gz --output-dir clean/ --workers 8 \\
        --jaccard-threshold 0.8 --shingle-size 5 --keywords badwords.txt \\
        --decontaminate evals/*.jsonl --decontaminate-keys question answer

Sharded (SLURM array, examples/clean_corpus_array.sbatch): each task runs
    --stage scan --num-shards N --shard-index I --work-dir W    (its files: inputs I, I+N, ...)
then one job runs the global near-duplicate pass and writes the outputs:
    --stage dedup --work-dir W --output-dir clean/

Memory stays bounded (two passes; only keys and signatures on disk between them); a malformed line
stops the run naming file:line (or --skip-bad-lines), and nothing is left half-written.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.cleaning import heuristics  # noqa: E402
from megatron_lite.data.cleaning.decontaminate import Decontaminator, FastTextFilter  # noqa: E402
from megatron_lite.data.cleaning.documents import FilterConfig  # noqa: E402
from megatron_lite.data.cleaning.minhash import MinHasher, lsh_params  # noqa: E402
from megatron_lite.data.cleaning.pipeline import check_outputs, clean, finish  # noqa: E402
from megatron_lite.data.cleaning.report import summary  # noqa: E402
from megatron_lite.data.cleaning.scan import CorpusError, scan_shard  # noqa: E402
from megatron_lite.data.corpus import BadLineError  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("input and output")
    g.add_argument("--input", nargs="+", help=".jsonl or .jsonl.gz files (names must differ)")
    g.add_argument("--json-key", default="text", help="the field holding the text (default text)")
    g.add_argument("--output-dir", help="cleaned files (same names) + report.json, report.txt")
    g.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed lines")
    g.add_argument("--report-examples", type=int, default=3, help="examples per rule (default 3)")
    g = p.add_argument_group("deduplication")
    g.add_argument("--jaccard-threshold", type=float, default=0.8, help="near-dup (default 0.8)")
    g.add_argument("--shingle-size", type=int, default=5, help="words per shingle (default 5)")
    g.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    g.add_argument("--minhash-seed", type=int, default=1, help="seed of the hash functions")
    g.add_argument("--dedup-partitions", type=int, default=64, help="key partitions (default 64)")
    g = p.add_argument_group("quality filters")
    g.add_argument(
        "--heuristics",
        nargs="*",
        default=list(heuristics.GROUPS),
        choices=heuristics.GROUPS,
        help="rule groups to apply (default all; none: give the flag alone)",
    )
    g.add_argument("--keywords", nargs="*", default=[], help="files of words; drop on any match")
    g.add_argument("--fasttext-model", help="fastText classifier / language-ID model (.bin)")
    g.add_argument("--fasttext-label", default="__label__en", help="label to keep")
    g.add_argument("--fasttext-threshold", type=float, default=0.5, help="min probability")
    g.add_argument("--decontaminate", nargs="*", default=[], help="evaluation task JSONL files")
    g.add_argument(
        "--decontaminate-keys", nargs="+", default=["text"], help="their text fields (default text)"
    )
    g.add_argument("--decontaminate-ngram", type=int, default=13, help="n (default 13)")
    g.add_argument("--decontaminate-action", choices=["drop", "report"], default="drop")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    g.add_argument("--stage", choices=["all", "scan", "dedup"], default="all")
    g.add_argument("--num-shards", type=int, default=1, help="--stage scan: shards in all")
    g.add_argument("--shard-index", type=int, default=0, help="--stage scan: this shard")
    g.add_argument("--work-dir", help="--stage scan/dedup: the shards' directory")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("workers", "num_shards", "shingle_size", "num_perm", "dedup_partitions"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.stage in ("scan", "dedup") and not args.work_dir:
        p.error(f"--stage {args.stage} needs --work-dir (the shards' directory)")
    if args.stage in ("all", "dedup") and not args.output_dir:
        p.error("--output-dir is required (where the cleaned files and the report go)")
    if args.stage == "dedup":
        return
    if not args.input:
        p.error("--input is required (.jsonl or .jsonl.gz files)")
    if not 0 <= args.shard_index < args.num_shards:
        p.error(f"--shard-index {args.shard_index} must be in [0, --num-shards {args.num_shards})")
    names: dict[str, str] = {}
    for path in args.input:
        if not os.path.isfile(path):
            p.error(f"--input {path}: no such file")
        base = os.path.basename(path)
        if base in names:
            p.error(f"--input {names[base]} and {path} have the same name (outputs are by name)")
        names[base] = path
    if args.stage == "all":
        try:
            check_outputs(args.input, args.output_dir)
        except ValueError as e:
            p.error(str(e))
    for flag, paths in (("--keywords", args.keywords), ("--decontaminate", args.decontaminate)):
        for path in paths:
            if not os.path.isfile(path):
                p.error(f"{flag} {path}: no such file")


def filter_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> FilterConfig:
    try:
        bands, rows = lsh_params(args.jaccard_threshold, args.num_perm)
        keywords = {os.path.basename(k): heuristics.read_keywords(k) for k in args.keywords}
        fasttext = None
        if args.fasttext_model:
            fasttext = FastTextFilter(
                args.fasttext_model, args.fasttext_label, args.fasttext_threshold
            )
            fasttext.check_label()
        decontaminator = None
        if args.decontaminate:
            decontaminator = Decontaminator(
                args.decontaminate, args.decontaminate_keys, args.decontaminate_ngram
            )
    except (OSError, ValueError) as e:
        p.error(str(e))
    return FilterConfig(
        text_key=args.json_key,
        groups=tuple(args.heuristics),
        keywords=keywords,
        fasttext=fasttext,
        decontaminator=decontaminator,
        decontaminate_action=args.decontaminate_action,
        minhasher=MinHasher(args.num_perm, args.shingle_size, args.minhash_seed),
        threshold=args.jaccard_threshold,
        bands=bands,
        rows=rows,
    )


def main(argv: list[str] | None = None) -> int:
    p = get_parser()
    args = p.parse_args(argv)
    _check(p, args)
    try:
        if args.stage == "dedup":
            report = finish(args.work_dir, args.output_dir, args.report_examples)
        else:
            cfg = filter_config(p, args)
            opts = dict(
                workers=args.workers,
                partitions=args.dedup_partitions,
                skip_bad_lines=args.skip_bad_lines,
                max_examples=args.report_examples,
            )
            if args.stage == "scan":
                os.makedirs(args.work_dir, exist_ok=True)
                m = scan_shard(
                    args.input, args.shard_index, args.num_shards, args.work_dir, cfg, **opts
                )
                st = m["stats"]
                print(
                    f"clean_corpus scan: shard {args.shard_index} of {args.num_shards}: "
                    f"{len(m['files'])} files, {st['read']} documents read, {m['docs']} pass the "
                    f"filters ({m['seconds']:.1f} s); next: --stage dedup --work-dir {args.work_dir}"
                )
                return 0
            report = clean(args.input, args.output_dir, cfg, **opts)
    except (BadLineError, CorpusError, FileNotFoundError, ValueError) as e:
        hint = "; fix the line or pass --skip-bad-lines" if isinstance(e, BadLineError) else ""
        print(f"clean_corpus: error: {e}\nno output written{hint}", file=sys.stderr)
        return 1
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
