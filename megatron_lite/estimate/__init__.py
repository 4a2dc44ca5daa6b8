"""Memory and throughput estimates for a megatron_lite run, from its flags (nothing is allocated).

    python tools/estimate.py <training flags> --world-size 64 --gpu-memory-gb 80 --search

`memory.py`: exact parameter, gradient-buffer and optimizer bytes per rank (the real model and DDP on
the meta device); `activations.py`: what a
microbatch keeps for backward (Korthikanti et al. 2022, adapted to our layer); `core.py`: one
configuration's estimate and the throughput model; `search.py`: the layouts that fit, ranked.
"""

from megatron_lite.estimate.activations import chunk_bytes, korthikanti_layer, layer_terms
from megatron_lite.estimate.core import Estimate, Hardware, StageEstimate, estimate, flops
from megatron_lite.estimate.memory import StaticMemory, static_memory
from megatron_lite.estimate.search import best_layouts

__all__ = [
    "Estimate",
    "Hardware",
    "StageEstimate",
    "StaticMemory",
    "best_layouts",
    "chunk_bytes",
    "estimate",
    "flops",
    "korthikanti_layer",
    "layer_terms",
    "static_memory",
]
