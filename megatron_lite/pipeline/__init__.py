"""Pipeline parallelism: p2p transfers, schedules (no pipelining, 1F1B, interleaved 1F1B, ZB-H1) run
from per-rank action lists, and a schedule simulator."""

from megatron_lite.pipeline.abort import PipelineAborted
from megatron_lite.pipeline.actions import Action, build_actions
from megatron_lite.pipeline.schedules import get_forward_backward_func, schedule_name

__all__ = [
    "Action",
    "PipelineAborted",
    "build_actions",
    "get_forward_backward_func",
    "schedule_name",
]
