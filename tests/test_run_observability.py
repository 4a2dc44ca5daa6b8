"""What Megatron-LM users' scripts ask to see of a run: W&B scalars, torch.profiler traces and
per-region timers (--wandb-*, --profile/--use-pytorch-profiler, --timing-log-level), through the real
entry point under torchrun."""

from __future__ import annotations

import glob
import json
import re
import struct

import pytest
from launch_util import TINY_GPT, layout_flags, losses, run_pretrain

from megatron_lite.arguments import parse_args
from megatron_lite.timers import Timers

ITERS = 4
FLAGS = [*TINY_GPT, "--train-iters", str(ITERS)]


def wandb_history(run_file: str) -> dict[int, dict[str, float]]:
    """step -> scalars, read from a W&B transaction log (`run-*.wandb`) with W&B's own protobufs.

    The file is a 7-byte header, then records in 32 KiB blocks, each record a 7-byte header
    (checksum u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", run_file
    pos, block, pending, history = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too small for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                history[int(items["_step"])] = items
    return history


@pytest.mark.slow
def test_wandb_offline_run_holds_the_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, wb = tmp_path / "tb", tmp_path / "wandb"
    flags = [*FLAGS, "--tensorboard-dir", str(tb), "--wandb-project", "megatron-lite-test"]
    flags += ["--wandb-exp-name", "tiny", "--wandb-save-dir", str(wb)]
    out = run_pretrain(1, flags, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = glob.glob(str(wb / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    history = wandb_history(runs[0])
    assert sorted(history) == list(range(1, ITERS + 1))
    for it, loss in losses(out.stdout).items():
        assert history[it]["lm loss"] == pytest.approx(loss, rel=1e-5)
    acc = EventAccumulator(str(tb))
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            assert history[event.step][tag] == pytest.approx(event.value, rel=1e-5), tag
    assert {"lm loss", "learning-rate", "grad-norm"} <= set(acc.Tags()["scalars"])


@pytest.mark.slow
def test_pytorch_profiler_traces_the_requested_steps_on_the_requested_ranks(tmp_path):
    flags = [*FLAGS, "--tensorboard-dir", str(tmp_path), "--profile", "--use-pytorch-profiler"]
    flags += ["--profile-step-start", "2", "--profile-step-end", "4", "--profile-ranks", "1"]
    run_pretrain(2, flags)
    traces = glob.glob(str(tmp_path / "*.pt.trace.json"))
    assert len(traces) == 1 and "rank1" in traces[0], traces  # rank 0 was not asked
    events = json.load(open(traces[0]))["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}  # [start, end)
    assert any(
        "aten::mm" in e.get("name", "") or "aten::addmm" in e.get("name", "") for e in events
    )


@pytest.mark.slow
def test_timers_report_each_region_across_ranks_and_change_no_numerics():
    base = [*FLAGS, *layout_flags(1, 2)]
    plain = losses(run_pretrain(2, base).stdout)
    out = run_pretrain(2, [*base, "--timing-log-level", "2", "--timing-log-option", "minmax"])
    assert losses(out.stdout) == plain
    assert out.stdout.count("(min, max) time across ranks (ms):") == ITERS
    for region in (
        "forward-backward",
        "all-grads-sync",
        "params-all-gather",
        "optimizer",
        "batch-generator",
        "pipeline-p2p",
    ):
        found = re.findall(rf"    {region} \.+: \(([0-9.]+), ([0-9.]+)\)", out.stdout)
        assert len(found) == ITERS, (region, out.stdout[-3000:])
        assert all(float(lo) <= float(hi) for lo, hi in found), region


def test_timer_report_formats():
    times = {"forward-backward": [2.0, 3.5], "optimizer": [1.0], "pipeline-p2p": []}
    minmax = Timers(1, "minmax").format(times)
    assert minmax.splitlines()[0] == "(min, max) time across ranks (ms):"
    assert "forward-backward ................................: (2.00, 3.50)" in minmax
    assert "pipeline-p2p" not in minmax  # no rank entered it
    assert Timers(1, "max").format(times).splitlines()[1].endswith(": 3.50")
    assert Timers(1, "all").format(times).splitlines()[1].endswith(": 2.00, 3.50")


def test_profiler_flags_are_checked(capsys):
    for flags, message in [
        ("--profile --use-pytorch-profiler", "--use-pytorch-profiler writes its traces into"),
        (
            "--profile --profile-step-start 5 --profile-step-end 5",
            "--profile-step-start (5) must be positive and less than --profile-step-end (5)",
        ),
    ]:
        with pytest.raises(SystemExit):
            parse_args([*FLAGS, *flags.split()])
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_profile_without_the_pytorch_profiler_needs_cuda():
    out = run_pretrain(1, [*FLAGS, "--profile"], check=False)
    assert out.returncode != 0
    assert "--profile without --use-pytorch-profiler opens an nsys capture range" in out.stdout
