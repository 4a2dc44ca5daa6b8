"""--profile: iterations [--profile-step-start, --profile-step-end) on --profile-ranks.

With --use-pytorch-profiler, torch.profiler records CPU (and CUDA) activity and writes one trace per
rank into --tensorboard-dir (`*.pt.trace.json`: TensorBoard's profiler plugin or Perfetto open it),
one `ProfilerStep#N` per iteration. Without it, as Megatron, the profiled iterations are a CUDA
profiler capture range for `nsys profile --capture-range=cudaProfilerApi`.
"""

from __future__ import annotations

import torch

from megatron_lite.config import ConfigError, LoggingConfig


def _record_every_step(step: int) -> torch.profiler.ProfilerAction:
    return torch.profiler.ProfilerAction.RECORD


class StepProfiler:
    def __init__(self, cfg: LoggingConfig, rank: int, dev: torch.device):
        self.cfg, self.rank, self.device = cfg, rank, dev
        self.enabled = cfg.profile and rank in cfg.profile_ranks
        self.torch_profiler: torch.profiler.profile | None = None
        self.capturing = False
        if self.enabled and not cfg.use_pytorch_profiler and dev.type != "cuda":
            raise ConfigError(
                "--profile without --use-pytorch-profiler opens an nsys capture range, which needs "
                "CUDA; add --use-pytorch-profiler for torch.profiler traces"
            )

    def before_iteration(self, iteration: int) -> None:
        """`iteration`: the one about to run (1-based)."""
        if not self.enabled or iteration != self.cfg.profile_step_start:
            return
        if self.cfg.use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            handler = torch.profiler.tensorboard_trace_handler(
                self.cfg.tensorboard_dir, worker_name=f"rank{self.rank}"
            )
            self.torch_profiler = torch.profiler.profile(
                activities=activities,
                schedule=_record_every_step,  # started here, stopped by us: one trace, N steps
                on_trace_ready=handler,
                record_shapes=True,
            )
            self.torch_profiler.step_num = iteration  # ProfilerStep#N names the iteration
            self.torch_profiler.start()
        else:
            torch.cuda.cudart().cudaProfilerStart()
            self.capturing = True

    def after_iteration(self, iteration: int) -> None:
        """`iteration`: the one that just ran."""
        if iteration + 1 >= self.cfg.profile_step_end:
            self.stop()  # a no-op unless profiling
        elif self.torch_profiler is not None:
            self.torch_profiler.step()

    def stop(self) -> None:
        """End profiling now (at the last profiled iteration, or when the run stops early)."""
        if self.torch_profiler is not None:
            self.torch_profiler.stop()  # writes the trace
            self.torch_profiler = None
        if self.capturing:
            torch.cuda.cudart().cudaProfilerStop()
            self.capturing = False
