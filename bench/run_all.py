"""`make bench`: every benchmark in bench/, one after another, then one table of their headline figures.

    .venv/bin/python bench/run_all.py               # all of them, the sizes below (~10 minutes here)
    .venv/bin/python bench/run_all.py eval serving  # only the scripts whose names contain these

Each script runs in its own process with the arguments in ARGS (sizes picked so that the whole run
fits in about 10 minutes on 2 cores; each script's docstring gives its full-size command) and prints
its full report as it goes. The table then lists, per script, the lines that carry a comparison (a
ratio, a speedup, a gain, a bubble against its formula) and the script's wall time. The figures vary
with machine load: each ratio compares runs made in the same script, never across scripts.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ARGS = {
    "bench_checkpoint.py": ["--layers", "4", "--hidden", "512", "--repeats", "2"],
    "bench_clean.py": [],
    "bench_context_parallel.py": ["--seq", "1024", "--steps", "3"],
    "bench_data.py": ["--corpus-mb", "4"],
    "bench_ddp.py": ["--steps", "5"],
    "bench_eval.py": [],
    "bench_model.py": ["--steps", "6"],
    "bench_moe.py": ["--steps", "5"],
    "bench_pipeline.py": [],
    "bench_pretrain.py": ["--iters", "20"],
    "bench_serving.py": [],
}
HEADLINE = re.compile(r"ratio|speedup|gain|\d\.\d+x\b| vs |bubble|GiB/s", re.IGNORECASE)


def main(argv: list[str]) -> int:
    scripts = sorted(p.name for p in BENCH.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if any(a in s for a in argv)]
    rows, failed = [], []
    for script in scripts:
        print(f"== {script} {' '.join(ARGS.get(script, []))}", flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / script), *ARGS.get(script, [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip())
        rc = proc.wait()
        secs = time.perf_counter() - start
        if rc != 0:
            failed.append(script)
        heads = [ln.strip() for ln in lines if HEADLINE.search(ln)] or ["(no comparison line)"]
        rows.append((script, secs, rc, heads))
    print("\n| bench | s | headline figures |\n| --- | ---: | --- |")
    for script, secs, rc, heads in rows:
        status = "" if rc == 0 else f" **failed (rc {rc})**"
        print(
            f"| {script}{status} | {secs:.0f} | {'<br>'.join(h.replace('|', '/') for h in heads)} |"
        )
    print(f"\ntotal {sum(r[1] for r in rows):.0f} s")
    if failed:
        print(f"error: {', '.join(failed)} failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
