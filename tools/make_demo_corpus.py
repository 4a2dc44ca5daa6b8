"""Write a JSONL corpus from text every Python installation has: the standard library's source
files and its documentation topics (`pydoc_data.topics`), so the demo needs no download.

    python tools/make_demo_corpus.py --output data/demo.jsonl [--max-mb 30]

One JSON object per line: {"text": ..., "source": ...}; files are visited in sorted order, so the
corpus is the same on every run with the same Python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig


def iter_documents(max_bytes: int):
    """(source, text) pairs: documentation topics first, then the stdlib's .py files."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]
    stdlib = sysconfig.get_paths()["stdlib"]
    total = 0
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__", "test"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            total += len(text)
            if total > max_bytes:
                return
            yield os.path.relpath(path, stdlib), text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", required=True, help="Path of the .jsonl file to write")
    p.add_argument("--max-mb", type=float, default=30.0, help="Stop after this much source code")
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    n = size = 0
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for source, text in iter_documents(int(args.max_mb * 2**20)):
            line = json.dumps({"text": text, "source": source}, ensure_ascii=False)
            f.write(line + "\n")
            n += 1
            size += len(line)
    os.replace(tmp, args.output)
    print(f"wrote {n} documents ({size / 2**20:.1f} MiB) to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
