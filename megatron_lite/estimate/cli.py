"""`tools/estimate.py`: training's flags plus a few about the cluster; prints the estimate.

    python tools/estimate.py --num-layers 24 --hidden-size 1024 --num-attention-heads 16 \\
        --seq-length 1024 --micro-batch-size 4 --global-batch-size 256 --bf16 \\
        --tensor-model-parallel-size 2 --world-size 64 --gpu-memory-gb 80 --search
"""

from __future__ import annotations

import argparse
import sys

from megatron_lite.arguments import build_parser, config_from_namespace
from megatron_lite.config import Config, ConfigError
from megatron_lite.data import build_tokenizer
from megatron_lite.estimate.activations import korthikanti_layer, layer_terms
from megatron_lite.estimate.core import GIB, Estimate, Hardware, estimate
from megatron_lite.estimate.moe import dispatch_bytes, parameter_counts
from megatron_lite.estimate.search import best_layouts

_EST = "estimator."
DEFAULT_VOCAB = 50257  # GPT-2's, when neither --vocab-size nor a tokenizer is given


def build_estimate_parser() -> argparse.ArgumentParser:
    parser = build_parser(prog="tools/estimate.py")
    parser.description = (
        "Per-GPU memory, FLOPs, pipeline bubble and the best layouts for a megatron_lite run "
        "(the same flags as training, plus the cluster below)."
    )
    g = parser.add_argument_group("estimator (the cluster; not training flags)")
    hw = Hardware()

    def add(flag: str, **kw) -> None:
        if kw.get("action") is None and "choices" not in kw:
            kw.setdefault("metavar", "N")
            if kw.get("default") is not None and "default" not in kw["help"]:
                kw["help"] += f" (default {kw['default']})"
        g.add_argument(flag, dest=_EST + flag[2:].replace("-", "_"), **kw)

    add("--world-size", type=int, help="GPUs (default tp x pp x --data-parallel-size)")
    add("--data-parallel-size", type=int, default=1, help="dp when --world-size is not given")
    add("--gpu-memory-gb", type=float, default=hw.gpu_memory_gb, help="GiB per GPU")
    add("--gpus-per-node", type=int, default=hw.gpus_per_node, help="GPUs per node")
    add("--efficiency", type=float, default=hw.efficiency, help="share of peak the matmuls reach")
    add("--intra-node-bandwidth", type=float, default=hw.intra_node_gbs, help="GB/s per GPU")
    add("--inter-node-bandwidth", type=float, default=hw.inter_node_gbs, help="GB/s per GPU")
    add("--memory-reserve-gb", type=float, default=hw.reserve_gb, help="CUDA context etc., GiB")
    add("--top", type=int, default=10, help="layouts to list with --search")
    add("--search", action="store_true", help="rank every layout of the world size that fits")
    add("--search-virtual-stages", action="store_true", help="also try 2 virtual stages")
    add("--allow-cross-node-tp", action="store_true", help="let the search put tp across nodes")
    add("--activation-device", choices=["cuda", "cpu"], default="cuda", help=argparse.SUPPRESS)
    return parser


def _vocab_size(cfg: Config) -> tuple[int, str]:
    """The tokenizer's vocabulary (as training pads it), else --vocab-size, else GPT-2's."""
    if cfg.data.tokenizer_type is not None:
        return build_tokenizer(cfg.data).vocab_size, cfg.data.tokenizer_type
    if cfg.data.vocab_size is not None:
        return cfg.data.vocab_size, "--vocab-size"
    return DEFAULT_VOCAB, "default (GPT-2); pass --vocab-size or a tokenizer"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def describe(est: Estimate, hw: Hardware, vocab: int, vocab_src: str, device: str) -> str:
    cfg, m = est.cfg, est.cfg.model
    prec = cfg.optim.precision
    lines = [
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, heads "
        f"{m.num_attention_heads} (query groups {m.num_query_groups}), seq {m.seq_length}, vocab "
        f"{vocab} ({vocab_src}) -> {est.padded_vocab} padded",
        f"layout: {est.layout} (world {cfg.world_size}), micro batch {cfg.train.micro_batch_size}"
        f" x {cfg.num_microbatches} microbatches = global {cfg.train.global_batch_size}, {prec}, "
        f"distributed optimizer {'on' if cfg.parallel.use_distributed_optimizer else 'off'}, "
        f"recompute {m.recompute_granularity or 'none'}, sequence parallel "
        f"{'on' if cfg.parallel.sequence_parallel else 'off'}",
        f"pipeline: {est.schedule}, bubble {100 * est.bubble_over_ideal:.1f}% of ideal compute time "
        f"({100 * est.bubble_over_total:.1f}% of total time)",
        f"FLOPs per iteration: model {est.model_flops:.3e}, recompute {est.recompute_flops:.3e} "
        f"(total {est.model_flops + est.recompute_flops:.3e})",
    ]
    if cfg.moe.enabled:
        e, n = cfg.moe, parameter_counts(cfg, est.padded_vocab)
        lines.append(
            f"experts: {e.num_experts} per MoE layer, top-{e.moe_router_topk}, ep "
            f"{e.expert_model_parallel_size} ({e.moe_token_dispatcher_type}); parameters "
            f"{n.total:,} ({n.experts:,} in experts), active per token {n.active:,}; dispatch "
            f"{dispatch_bytes(cfg) / 2**20:.2f} MiB per MoE layer and microbatch per GPU"
        )
    lines += [
        "",
        "memory per GPU (GiB; exact: params, grads, optimizer; modelled: activations)",
        "  stage   params    grads  optimizer  activations  in-flight    total",
    ]
    for s in est.stages:
        st = s.static
        lines.append(
            f"  {s.pp_rank:5d} {_gib(st.params):>8} {_gib(st.grads):>8} {_gib(st.optimizer):>10} "
            f"{_gib(s.activations):>12} {s.in_flight:10d} {_gib(s.total):>8}"
        )
    fits = "fits" if est.peak_memory <= hw.usable else "DOES NOT FIT"
    lines += [
        f"  usable per GPU {_gib(hw.usable)} GiB of {hw.gpu_memory_gb:g} (minus "
        f"{100 * hw.fragmentation:.0f}% fragmentation and {hw.reserve_gb:g} GiB reserve): {fits}",
        "",
        "activations of one layer, one microbatch, one tp rank (MiB):",
    ]
    for name, b in layer_terms(cfg, device=device).items():
        lines.append(f"  {name:34s} {b / 2**20:10.2f}")
    ours = sum(layer_terms(cfg, device=device).values())
    paper = korthikanti_layer(cfg)
    terms = " + ".join(f"{k} = {v / 2**20:.2f}" for k, v in paper.items())
    lines += [
        f"  {'total (ours)':34s} {ours / 2**20:10.2f}",
        f"  Korthikanti et al. 2022 (16-bit, with dropout masks): {terms} "
        f"= {sum(paper.values()) / 2**20:.2f}",
        "",
        "throughput model (a model, not a measurement): iteration "
        f"{est.iteration_time:.3f} s = "
        + ", ".join(f"{k} {v:.3f}" for k, v in est.times.items())
        + f"; {est.tokens_per_sec_per_gpu:,.0f} tokens/s/GPU, MFU {100 * est.mfu(hw):.1f}%",
    ]
    return "\n".join(lines)


def layout_table(ests: list[Estimate], hw: Hardware) -> str:
    rows = [
        "   #  layout            micro  zero  recompute  mem/GPU GiB  tokens/s/GPU    MFU  bubble",
    ]
    for i, e in enumerate(ests, 1):
        c = e.cfg
        rows.append(
            f"  {i:2d}  {e.layout:16s} {c.train.micro_batch_size:6d} "
            f"{'yes' if c.parallel.use_distributed_optimizer else 'no':>5}  "
            f"{c.model.recompute_granularity or 'none':9s} {_gib(e.peak_memory):>12} "
            f"{e.tokens_per_sec_per_gpu:13,.0f} {100 * e.mfu(hw):5.1f}% "
            f"{100 * e.bubble_over_ideal:6.1f}%"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = build_estimate_parser()
    ns = parser.parse_args(argv)
    opts = {k[len(_EST) :]: v for k, v in vars(ns).items() if k.startswith(_EST)}
    for k in list(vars(ns)):
        if k.startswith(_EST):
            delattr(ns, k)
    try:
        cfg = config_from_namespace(ns)
        p = cfg.parallel
        world = opts["world_size"] or (
            p.tensor_model_parallel_size
            * p.pipeline_model_parallel_size
            * opts["data_parallel_size"]
        )
        cfg.finalize(world)
    except ConfigError as e:
        parser.error(str(e))
    hw = Hardware(
        gpu_memory_gb=opts["gpu_memory_gb"],
        gpus_per_node=opts["gpus_per_node"],
        peak_tflops=cfg.logging.peak_tflops or Hardware().peak_tflops,
        efficiency=opts["efficiency"],
        intra_node_gbs=opts["intra_node_bandwidth"],
        inter_node_gbs=opts["inter_node_bandwidth"],
        reserve_gb=opts["memory_reserve_gb"],
    )
    vocab, src = _vocab_size(cfg)
    device = opts["activation_device"]
    est = estimate(cfg, cfg.padded_vocab_size(vocab), hw, device)
    print(describe(est, hw, vocab, src, device))
    if opts["search"]:
        best, tried = best_layouts(
            cfg,
            world,
            vocab,
            hw,
            opts["top"],
            opts["allow_cross_node_tp"],
            opts["search_virtual_stages"],
        )
        print(
            f"\nbest layouts on {world} GPUs of {hw.gpu_memory_gb:g} GiB, ranked by the throughput"
            f" model (a model, not a measurement): {tried} candidates tried, top {len(best)} "
            "that fit"
        )
        print(layout_table(best, hw) if best else "  no layout fits: more GPUs or a smaller model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
