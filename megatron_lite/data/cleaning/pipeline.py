"""The cleaner end to end: pass 1 per shard (`scan.py`), pass 2 global (`dedup.py`), the report.

`clean` runs both passes on one machine (one shard, `workers` processes). Under SLURM each array
task runs `scan_shard` on its shard and a final job runs `finish` over all the shards' directories
(examples/clean_corpus_array.sbatch). Outputs (one cleaned file per input, same name and
compression, plus report.json and report.txt) are written under temporary names and renamed only
when every one is complete: a failure leaves no partial output.
"""

from __future__ import annotations

import os
import shutil
import time

from megatron_lite.data.cleaning.dedup import Shards, find_duplicates, load_manifests, write_outputs
from megatron_lite.data.cleaning.documents import FilterConfig
from megatron_lite.data.cleaning.report import RuleStats, summary, write_atomically, write_json
from megatron_lite.data.cleaning.scan import scan_shard

REPORT_JSON, REPORT_TEXT = "report.json", "report.txt"


def check_outputs(inputs: list[str], output_dir: str) -> None:
    """ValueError when an output (a cleaned file or a report) is, or links to, one of the inputs:
    the rename at the end would replace the input with its cleaned copy."""
    real = {os.path.realpath(i): i for i in inputs}
    outputs = [os.path.basename(i) for i in inputs] + [REPORT_JSON, REPORT_TEXT]
    for name in outputs:
        out = os.path.join(output_dir, name)
        if os.path.realpath(out) in real:
            raise ValueError(
                f"--output-dir {output_dir}: the output {out} would overwrite the input "
                f"{real[os.path.realpath(out)]}; pick an --output-dir apart from the inputs"
            )


def finish(
    work_dir: str, output_dir: str, max_examples: int = 3, start: float | None = None
) -> dict:
    """Pass 2 over every shard in `work_dir`: drop duplicates, write the outputs and the report."""
    start = time.time() if start is None else start
    manifests = load_manifests(work_dir)
    check_outputs([f["input"] for m in manifests for f in m["files"]], output_dir)
    os.makedirs(output_dir, exist_ok=True)
    flag_dir = os.path.join(work_dir, f"dedup.tmp-{os.getpid()}")
    os.makedirs(flag_dir)
    renames: list[tuple[str, str]] = []
    try:
        shards = Shards(work_dir, manifests, flag_dir)
        lsh = manifests[0]["lsh"]
        find_duplicates(work_dir, shards, lsh["threshold"])
        stats = RuleStats(max_examples)
        for m in manifests:
            stats.merge(RuleStats.from_dict(m["stats"], max_examples))
        text_key = manifests[0]["text_key"]
        renames = write_outputs(work_dir, shards, output_dir, stats, text_key)
        del shards  # close the memory maps before their directory goes
        report = {
            "stats": stats.to_dict(),
            "lsh": lsh,
            "decontamination": _decontamination(manifests),
            "shards": len(manifests),
            "outputs": [final for _, final in renames],
            "seconds": time.time() - start,
        }
        text = summary(report)
        for name, write in ((REPORT_JSON, write_json), (REPORT_TEXT, write_atomically)):
            tmp = os.path.join(output_dir, f"{name}.tmp-{os.getpid()}")
            write(tmp, report if name == REPORT_JSON else text + "\n")
            renames.append((tmp, os.path.join(output_dir, name)))
        for tmp, final in renames:
            os.replace(tmp, final)
        renames = []
        return report
    finally:
        for tmp, _ in renames:  # only left when something failed
            if os.path.exists(tmp):
                os.unlink(tmp)
        shutil.rmtree(flag_dir, ignore_errors=True)


def _decontamination(manifests: list[dict]) -> dict | None:
    if manifests[0]["decontamination"] is None:
        return None
    d = dict(manifests[0]["decontamination"])
    d["documents_overlapping"] = sum(
        m["decontamination"]["documents_overlapping"] for m in manifests
    )
    return d


def clean(
    inputs: list[str],
    output_dir: str,
    cfg: FilterConfig,
    *,
    workers: int = 1,
    partitions: int = 64,
    skip_bad_lines: bool = False,
    max_examples: int = 3,
    work_dir: str | None = None,
) -> dict:
    """Both passes on this machine; the report (also written to output_dir)."""
    start = time.time()
    os.makedirs(output_dir, exist_ok=True)
    work = work_dir or os.path.join(output_dir, f".clean-work-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    try:
        scan_shard(
            inputs,
            0,
            1,
            work,
            cfg,
            workers=workers,
            partitions=partitions,
            skip_bad_lines=skip_bad_lines,
            max_examples=max_examples,
        )
        return finish(work, output_dir, max_examples, start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
