"""One configuration's estimate: memory per pipeline stage, FLOPs, bubble and a throughput model.

Memory per rank = parameters + gradient buffers + optimizer state (exact, `memory.py`) + the peak of
activations over the step (`activations.py` per microbatch and chunk, walked over the schedule's real
action list, `pipeline/actions.py`: a microbatch's chunk activations live from its F to its last
backward part). Transient buffers (p2p receive buffers, fp16 gradient copies, the all-gather staging
of the distributed optimizer, allocator fragmentation, CUDA context) are not counted: `Hardware.usable`
keeps a reserve for them.

The throughput model (README, "Estimating memory and throughput") is a model, not a measurement:
  T = (compute + tp_comm) x (1 + bubble) + pp_comm + dp_comm
  compute = (model + recompute FLOPs) / (world x peak x efficiency)
  tp_comm = 4 (6 with full recompute) ring all-reduces of [s, b, h] per layer and microbatch
  dp_comm = gradient all-reduce (ZeRO-1: reduce-scatter + parameter all-gather); under
            --overlap-grad-reduce minus the last microbatch's backward (2/3 of its compute), under
            --overlap-param-gather the all-gather minus the first microbatch's forward (1/3)
  pp_comm = one activation and one gradient transfer per microbatch and chunk
  ep_comm = MoE token dispatch and combine, forward and backward (`moe.py`)
  cp_comm = ring attention's K/V and dK/dV blocks (`activations.ring_bytes`) per layer and
            microbatch, counted as if not hidden behind the block compute (an upper bound)
Ring collectives move 2 (n - 1) / n (all-reduce) or (n - 1) / n (reduce-scatter, all-gather) of the
buffer per GPU; a group inside one node runs at the intra-node bandwidth, else at the inter-node one.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

from megatron_lite.config import Config
from megatron_lite.estimate.activations import chunk_bytes, dims, ring_bytes
from megatron_lite.estimate.memory import StaticMemory, static_memory
from megatron_lite.estimate.moe import ep_comm_seconds
from megatron_lite.model.flops import model_flops_per_token
from megatron_lite.pipeline.schedules import schedule_name
from megatron_lite.pipeline.simulate import peak_in_flight, simulate

GIB = 2**30


@dataclass
class Hardware:
    gpu_memory_gb: float = 80.0  # GiB per GPU
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # H100 SXM dense bf16 (megatron_lite/device.py)
    efficiency: float = 0.6  # fraction of peak the model's matmuls reach
    intra_node_gbs: float = 300.0  # GB/s per GPU, NVLink-class
    inter_node_gbs: float = 25.0  # GB/s per GPU, 200 Gb/s InfiniBand
    reserve_gb: float = 2.0  # CUDA context, NCCL and cuBLAS workspaces
    fragmentation: float = 0.08  # share of memory the caching allocator loses

    @property
    def usable(self) -> float:
        """Bytes a rank may fill with what the estimate counts."""
        return (self.gpu_memory_gb * (1 - self.fragmentation) - self.reserve_gb) * GIB


@dataclass
class StageEstimate:
    pp_rank: int
    static: StaticMemory
    activations: int  # peak over the step
    in_flight: int  # peak microbatch-chunks holding activations

    @property
    def total(self) -> int:
        return self.static.total + self.activations


@dataclass
class Estimate:
    cfg: Config
    padded_vocab: int
    schedule: str
    stages: list[StageEstimate]
    model_flops: float  # per iteration, whole job
    recompute_flops: float
    bubble_over_ideal: float
    bubble_over_total: float
    times: dict[str, float] = field(default_factory=dict)  # seconds per iteration

    @property
    def peak_memory(self) -> int:
        return max(s.total for s in self.stages)

    @property
    def iteration_time(self) -> float:
        return sum(self.times.values())

    @property
    def tokens_per_sec_per_gpu(self) -> float:
        cfg = self.cfg
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        return tokens / self.iteration_time / cfg.world_size

    def mfu(self, hw: Hardware) -> float:
        return self.model_flops / (
            self.iteration_time * self.cfg.world_size * hw.peak_tflops * 1e12
        )

    @property
    def layout(self) -> str:
        p, c = self.cfg.parallel, self.cfg
        text = f"tp{p.tensor_model_parallel_size} pp{p.pipeline_model_parallel_size}"
        if p.context_parallel_size > 1:
            text += f" cp{p.context_parallel_size}"
        if (c.virtual_pipeline_size or 1) > 1:
            text += f" v{c.virtual_pipeline_size}"
        return text + f" dp{c.data_parallel_size}"


def schedule_of(cfg: Config) -> str:
    return schedule_name(cfg, cfg.parallel.pipeline_model_parallel_size)


@functools.lru_cache(maxsize=256)
def _simulation(schedule: str, p: int, m: int, v: int):
    return simulate(schedule, p, m, v)


def flops(cfg: Config, padded_vocab: int) -> tuple[float, float]:
    """(model FLOPs, recompute FLOPs) per iteration: the training log's formula x tokens."""
    m = cfg.model
    tokens = cfg.train.global_batch_size * m.seq_length
    plain = copy.deepcopy(cfg)
    plain.model.recompute_granularity = None
    model = model_flops_per_token(plain, padded_vocab)
    if m.recompute_granularity == "full":
        extra = model_flops_per_token(cfg, padded_vocab) - model
        per_chunk = m.num_layers // (cfg.parallel.pipeline_model_parallel_size * _v(cfg))
        if m.recompute_method == "block":
            extra *= min(m.recompute_num_layers, per_chunk) / per_chunk
    elif m.recompute_granularity == "selective":  # the attention core's forward, again
        extra = m.num_layers * 2 * 2 * m.seq_length * m.num_attention_heads * m.kv_channels
    else:
        extra = 0.0
    return model * tokens, extra * tokens


def _v(cfg: Config) -> int:
    return cfg.virtual_pipeline_size or 1


def estimate(
    cfg: Config, padded_vocab: int, hw: Hardware | None = None, device: str = "cuda"
) -> Estimate:
    """`cfg` must be finalized (`cfg.finalize(world_size)`)."""
    hw = hw or Hardware()
    pp, m = cfg.parallel.pipeline_model_parallel_size, cfg.num_microbatches
    schedule = schedule_of(cfg)
    sim = _simulation(schedule, pp, m, _v(cfg) if schedule == "interleaved" else 1)
    split = schedule == "zero-bubble"
    stages = []
    for r in range(pp):
        weights = chunk_bytes(cfg, padded_vocab, r, device)
        stages.append(
            StageEstimate(
                r,
                static_memory(cfg, padded_vocab, r),
                peak_in_flight(sim.actions[r], split, weights),
                sim.peak_activations[r],
            )
        )
    model_f, recompute_f = flops(cfg, padded_vocab)
    est = Estimate(
        cfg,
        padded_vocab,
        schedule,
        stages,
        model_f,
        recompute_f,
        sim.bubble_over_ideal(0),
        sim.bubble_over_total(0),
    )
    est.times = _times(est, hw)
    return est


def _ring(n: int, nbytes: float, bw_gbs: float, all_reduce: bool = True) -> float:
    if n <= 1:
        return 0.0
    return (2 if all_reduce else 1) * (n - 1) / n * nbytes / (bw_gbs * 1e9)


def _times(est: Estimate, hw: Hardware) -> dict[str, float]:
    cfg = est.cfg
    p, mdl = cfg.parallel, cfg.model
    tp, pp, dp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        cfg.data_parallel_size,
    )
    m, x, gpn = cfg.num_microbatches, dims(cfg), hw.gpus_per_node
    rate = cfg.world_size * hw.peak_tflops * 1e12 * hw.efficiency
    compute = (est.model_flops + est.recompute_flops) / rate
    per_layer = 6 if mdl.recompute_granularity == "full" else 4
    tp_bw = hw.intra_node_gbs if tp <= gpn else hw.inter_node_gbs
    layers = mdl.num_layers // pp
    tp_comm = layers * m * per_layer * _ring(tp, x.s * x.b * x.h * x.a, tp_bw)
    cp = p.context_parallel_size  # cp ranks sit tp apart, dp ranks tp x cp apart
    cp_bw = hw.intra_node_gbs if tp * cp <= gpn else hw.inter_node_gbs
    cp_comm = layers * m * sum(ring_bytes(cfg).values()) / (cp_bw * 1e9)
    # dp ranks of one (tp, pp) position sit tp x cp apart: one node holds them when tp x cp x dp <= gpn
    dp_bw = hw.intra_node_gbs if tp * cp * dp <= gpn else hw.inter_node_gbs
    worst = max(est.stages, key=lambda s: s.static.grads)
    gather = 0.0
    if p.use_distributed_optimizer:  # shards over dp; the cp ranks' partial sums all-reduced first
        dp_comm = _ring(dp, worst.static.grads, dp_bw, False) + _ring(cp, worst.static.grads, cp_bw)
        gather = _ring(dp, worst.static.params, dp_bw, False)
    else:  # one all-reduce over dp x cp
        dp_comm = _ring(dp * cp, worst.static.grads, dp_bw)
    if p.overlap_grad_reduce:  # hidden behind the last microbatch's backward (2/3 of its compute)
        dp_comm = max(0.0, dp_comm - 2 / 3 * compute / m)
    if p.overlap_param_gather:  # hidden behind the first microbatch's forward (1/3 of its compute)
        gather = max(0.0, gather - 1 / 3 * compute / m)
    dp_comm += gather
    pp_bw = hw.intra_node_gbs if tp * dp * pp <= gpn else hw.inter_node_gbs
    pp_comm = 0.0
    if pp > 1:
        pp_comm = 2 * m * _v(cfg) * x.sl * x.b * x.h * x.a / (pp_bw * 1e9)
    times = {
        "compute": compute,
        "tp comm": tp_comm,
        "bubble": (compute + tp_comm) * est.bubble_over_ideal,
        "pp comm": pp_comm,
        "dp comm": dp_comm,
        "cp comm": cp_comm,
    }
    if cfg.moe.enabled:  # token dispatch over ep, not overlapped
        times["ep comm"] = ep_comm_seconds(cfg, hw.intra_node_gbs, hw.inter_node_gbs, gpn)
    return times
