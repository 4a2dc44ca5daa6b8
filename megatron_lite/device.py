"""The one place that talks to torch.cuda: everything else asks here for the device."""

from __future__ import annotations

import os

import torch

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def params_dtype(optim_cfg) -> torch.dtype:
    """The model weights' torch dtype for an OptimConfig (--bf16 / --fp16 / neither)."""
    return PRECISION_DTYPES[optim_cfg.precision]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_count() -> int:
    """GPUs on this machine (0 without CUDA)."""
    return torch.cuda.device_count() if cuda_available() else 0


def default_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def get_device(local_rank: int | None = None) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK (or SLURM_LOCALID) when CUDA is present, else cpu."""
    if not cuda_available():
        return torch.device("cpu")
    if local_rank is None:  # torchrun's LOCAL_RANK, else SLURM_LOCALID (srun, no torchrun)
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


# Dense bf16/fp16 tensor-core peak TFLOP/s per GPU (vendor data sheets); more specific names first.
_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
    ("V100", 125.0),
)


def peak_tflops(device: torch.device) -> float | None:
    """Half-precision peak of this GPU when its name is known, for MFU; None on CPU or unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in _PEAK_TFLOPS if key in name), None)


def comm_device(backend: str) -> torch.device:
    """Where a tensor for a collective must live: the CPU under gloo, this rank's GPU under NCCL."""
    return torch.device("cpu") if backend == "gloo" else get_device()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory use in MiB: allocated/reserved on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return {
            "allocated_mib": torch.cuda.memory_allocated(device) / 2**20,
            "max_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "reserved_mib": torch.cuda.memory_reserved(device) / 2**20,
        }
    import resource

    # ru_maxrss is in KiB on Linux
    return {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if cuda_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
