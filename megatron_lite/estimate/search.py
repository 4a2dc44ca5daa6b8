"""Every layout of a world size that fits in GPU memory, ranked by the throughput model.

Enumerated: tp dividing the attention heads and query groups (at most a node's GPUs unless asked),
pp dividing the layers, dp = world / (tp x pp x cp) (cp as given) with the global batch divisible
by micro x dp, micro batch sizes 1, 2, 4, 8 (and the one given), the distributed optimizer on/off
(dp > 1), recompute none / selective / full, and optionally 2 virtual stages. Sequence parallelism
is on whenever tp > 1 (it only saves memory, for the same communication volume). Each candidate goes through the same
`Config` validation as training, so an impossible one is skipped for the reason training would give.
"""

from __future__ import annotations

from collections.abc import Iterator

from megatron_lite.config import Config, ConfigError
from megatron_lite.estimate.core import Estimate, Hardware, estimate

RECOMPUTE = (None, "selective", "full")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_configs(
    base: Config, world: int, hw: Hardware, allow_cross_node_tp: bool = False, vpp: bool = False
) -> Iterator[Config]:
    m = base.model
    tp_max = world if allow_cross_node_tp else min(world, hw.gpus_per_node)
    micro = sorted({1, 2, 4, 8, base.train.micro_batch_size})
    d = base.to_dict()
    for k in ("world_size", "data_parallel_size", "num_microbatches"):
        d[k] = None
    cp = base.parallel.context_parallel_size  # kept as given: it follows from the sequence length
    for tp in _divisors(tp_max):
        if world % tp or m.num_query_groups % tp:
            continue
        for pp in _divisors(m.num_layers):
            if world % (tp * pp * cp):
                continue
            dp = world // (tp * pp * cp)
            for virtual in (None, 2) if vpp and pp > 1 else (None,):
                for mbs in micro:
                    for zero in (False, True) if dp > 1 else (False,):
                        for rc in RECOMPUTE:
                            c = _variant(d, tp, pp, virtual, mbs, zero, rc, world)
                            if c is not None:
                                yield c


def _variant(d: dict, tp, pp, virtual, mbs, zero, recompute, world) -> Config | None:
    par = dict(d["parallel"], tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    par["use_distributed_optimizer"] = zero
    par["sequence_parallel"] = tp > 1
    par["num_layers_per_virtual_pipeline_stage"] = None
    if virtual:
        per_stage = d["model"]["num_layers"] // pp
        if per_stage % virtual:
            return None
        par["num_layers_per_virtual_pipeline_stage"] = per_stage // virtual
        par["pipeline_schedule"] = "1f1b"
    model = dict(d["model"], recompute_granularity=recompute, recompute_method=None)
    model["recompute_num_layers"] = 1
    train = dict(d["train"], micro_batch_size=mbs)
    try:
        return Config.from_dict(dict(d, parallel=par, model=model, train=train)).finalize(world)
    except ConfigError:
        return None


def best_layouts(
    base: Config,
    world: int,
    vocab_size: int,
    hw: Hardware,
    top: int = 10,
    allow_cross_node_tp: bool = False,
    vpp: bool = False,
) -> tuple[list[Estimate], int]:
    """(the `top` fitting estimates by tokens/s per GPU, how many candidates were tried)."""
    fits, tried = [], 0
    for cfg in candidate_configs(base, world, hw, allow_cross_node_tp, vpp):
        tried += 1
        est = estimate(cfg, cfg.padded_vocab_size(vocab_size), hw)
        if est.peak_memory <= hw.usable:
            fits.append(est)
    fits.sort(key=lambda e: -e.tokens_per_sec_per_gpu)
    return fits[:top], tried
