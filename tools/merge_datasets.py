"""Merge several `.bin/.idx` pairs into one (documents in the order given).

    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document

`--input` is a directory (every pair in it, sorted by name, as Megatron-LM's tool) or prefixes.
The output is written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetError,
    data_file_path,
    index_file_path,
    merge_datasets,
)


def input_prefixes(inputs: list[str]) -> list[str]:
    prefixes = []
    for entry in inputs:
        if os.path.isdir(entry):
            names = sorted(f[: -len(".idx")] for f in os.listdir(entry) if f.endswith(".idx"))
            if not names:
                raise FileNotFoundError(f"--input {entry}: no .idx files in this directory")
            prefixes += [os.path.join(entry, n) for n in names]
        else:
            prefix = entry.removesuffix(".bin").removesuffix(".idx")
            for path in (data_file_path(prefix), index_file_path(prefix)):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"--input {entry}: no such file {path}")
            prefixes.append(prefix)
    return prefixes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="A directory, or dataset prefixes")
    p.add_argument("--output-prefix", required=True, help="Writes {prefix}.bin and {prefix}.idx")
    args = p.parse_args(argv)
    try:
        prefixes = input_prefixes(args.input)
        tmp = f"{args.output_prefix}.tmp-{os.getpid()}"
        try:
            merge_datasets(prefixes, tmp)
            for fn in (data_file_path, index_file_path):
                os.replace(fn(tmp), fn(args.output_prefix))
        finally:
            for fn in (data_file_path, index_file_path):
                if os.path.exists(fn(tmp)):
                    os.unlink(fn(tmp))
    except (OSError, IndexedDatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
