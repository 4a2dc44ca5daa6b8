"""Corpus cleaning at scale: exact and near-duplicate removal (MinHash + LSH), Gopher and C4 quality
heuristics, keyword lists, an optional fastText classifier, 13-gram decontamination; streaming in
two passes with bounded memory, `--workers` processes, and shards under SLURM.

    python tools/clean_corpus.py --input data/*.jsonl.gz --output-dir clean/ --workers 8

`text.py` words and hashes; `minhash.py` signatures and LSH; `heuristics.py` Gopher and C4 rules;
`decontaminate.py` 13-grams of evaluation sets and the fastText filter; `documents.py` one document
through all of them; `scan.py` pass 1 (per shard); `dedup.py` pass 2 (global); `report.py` counts and
examples; `pipeline.py` both passes. README, "Cleaning a corpus".
"""

from megatron_lite.data.cleaning.documents import FilterConfig
from megatron_lite.data.cleaning.minhash import MinHasher, lsh_params
from megatron_lite.data.cleaning.pipeline import clean, finish
from megatron_lite.data.cleaning.scan import CorpusError, scan_shard

__all__ = [
    "CorpusError",
    "FilterConfig",
    "MinHasher",
    "clean",
    "finish",
    "lsh_params",
    "scan_shard",
]
