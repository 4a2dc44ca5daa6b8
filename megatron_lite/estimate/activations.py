"""Activation memory: what one microbatch leaves saved for backward, and how many are in flight.

The reference is Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (section 4): per layer sbh(34 + 5as/h) bytes at 16 bits with dropout, sbh(10 + 24/t +
5as/(ht)) with tensor parallelism, sbh/t (34 + 5as/h) with tensor + sequence parallelism, the 5as/h
attention term gone under selective recomputation, 2sbh (the layer input) under full recomputation.
`korthikanti_layer` evaluates those formulas.

`layer_terms` counts what *our* layer (`model/transformer.py`) keeps, tensor by tensor, so the same
bookkeeping covers fp32 CPU runs, dropout off (no masks), SDPA/flash (no s x s tensors) or the fused /
unfused softmax (s x s probabilities), RMSNorm's fp32 copies, SwiGLU, GQA's expanded keys and values
(`repeat_interleave`), rotary copies and biases. Two differences from the paper's model: our column-
parallel linears keep their all-gathered input (full s, not s/t) under sequence parallelism, and
SDPA keeps its output besides q, k, v. A chunk that sends its output down the pipeline keeps it until
its backward. Data-loader inputs (tokens, labels, masks) are not counted.

Under context parallelism every tensor holds this rank's s / cp tokens, and ring attention keeps
q, k, v (not expanded over GQA groups), its fp32 output and log-sum-exp in place of the core's.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config import Config
from megatron_lite.device import params_dtype
from megatron_lite.model.gpt import stage_chunks
from megatron_lite.model.transformer import resolve_attention_backend


@dataclass(frozen=True)
class Dims:
    s: int  # sequence length on this rank (seq_length / cp)
    b: int  # micro batch size
    h: int
    t: int  # tensor-parallel size
    sl: int  # sequence length of the tensors between tp regions (s / t under sequence parallelism)
    a: int  # bytes per activation element
    nq: int  # query heads per tp rank
    ng: int  # key/value groups per tp rank
    d: int  # head dim
    f: int  # ffn size per tp rank
    mask: int  # bytes per dropout-mask element: bool on CUDA, the activation dtype on CPU
    cp: int = 1  # context-parallel size


def dims(cfg: Config, device: str = "cuda") -> Dims:
    """`device`: "cuda" (what the estimate is for) or "cpu" (how the tests measure it): torch's CPU
    dropout keeps its mask in the activation dtype, the CUDA kernel as bool."""
    m, p = cfg.model, cfg.parallel
    t, cp = p.tensor_model_parallel_size, p.context_parallel_size
    a = params_dtype(cfg.optim).itemsize
    s = m.seq_length // cp
    return Dims(
        s=s,
        b=cfg.train.micro_batch_size,
        h=m.hidden_size,
        t=t,
        sl=s // t if p.sequence_parallel else s,
        a=a,
        nq=m.num_attention_heads // t,
        ng=m.num_query_groups // t,
        d=m.kv_channels,
        f=m.ffn_hidden_size // t,
        mask=1 if device == "cuda" else a,
        cp=cp,
    )


def attention_backend(cfg: Config) -> str:
    """As `CoreAttention` resolves it (auto -> sdpa; fused without --masked-softmax-fusion -> unfused)."""
    m = cfg.model
    return resolve_attention_backend(m.attention_backend, m.masked_softmax_fusion, "cuda")


def _norm_terms(cfg: Config, x: Dims) -> int:
    """LayerNorm: its input and fp32 mean/rstd. RMSNorm (ours): an fp32 copy of the input (the input
    itself in fp32), the normalized tensor before the weight, and fp32 1/rms."""
    n = x.sl * x.b * x.h
    if cfg.model.normalization == "RMSNorm":
        return 4 * n + x.a * n + 4 * x.sl * x.b
    return x.a * n + 2 * 4 * x.sl * x.b


def _attention_terms(cfg: Config, x: Dims, selective: bool) -> dict[str, int]:
    """Storages kept from the QKV output to the projection input, following SelfAttention.forward."""
    m = cfg.model
    sb = x.s * x.b
    q_numel, kv_numel = sb * x.nq * x.d, sb * x.ng * x.d
    storages: dict[str, int] = {}  # storage name -> elements (activation dtype)
    extra: dict[str, int] = {}  # bytes not in the activation dtype
    gqa = x.nq != x.ng
    q = k = v = "qkv output"
    if gqa and x.ng > 1:  # the reshape of the per-group q slice into heads copies
        q = "q copy"
    if m.position_embedding_type == "rope":  # rotated q, k are new tensors; inputs not kept
        q, k = "rotary q", "rotary k"
    sizes = {"qkv output": q_numel + 2 * kv_numel, "q copy": q_numel, "rotary q": q_numel}
    sizes["rotary k"] = kv_numel
    if selective:  # checkpoint(core_attention, q, k, v): only the inputs stay
        kept = {q, k, v}
    elif (
        x.cp > 1
    ):  # ring attention: its inputs, fp32 output and log-sum-exp (GQA expands per block)
        kept = {q, k, v}
        extra["ring output (fp32)"] = 4 * q_numel
        extra["ring logsumexp"] = 4 * x.b * x.nq * x.s
    else:
        if gqa:  # keys and values repeated to every query head inside the core
            k, v = "expanded k", "expanded v"
            sizes["expanded k"] = sizes["expanded v"] = q_numel
        kept = {q, k, v}
        backend = attention_backend(cfg)
        probs = x.b * x.nq * x.s * x.s
        if backend == "sdpa":  # flash: output ([b, s, n, d] inside, so the projection input is a
            # view of it) and fp32 log-sum-exp; no s x s tensor
            extra["sdpa logsumexp"] = 4 * x.b * x.nq * x.s
        else:
            # fused kernel: its output; torch path: the fp32 softmax, and its 16-bit cast when the
            # matmul with v (not dropout, which keeps only its mask) reads it
            extra["softmax output"] = (x.a if backend == "fused" else 4) * probs
            if backend != "fused" and x.a != 4 and m.attention_dropout == 0:
                extra["softmax output"] += x.a * probs
            if m.attention_dropout > 0:
                extra["attention dropout mask + output"] = (x.mask + x.a) * probs
    for name in sorted(kept):
        storages[name] = sizes[name]
    storages["projection input"] = q_numel  # the sdpa output under sdpa; a copy under cp
    out = {name: x.a * n for name, n in storages.items()}
    out.update(extra)
    return out


def layer_terms(cfg: Config, granularity: str | None = "", device: str = "cuda") -> dict[str, int]:
    """Bytes one transformer layer keeps for backward for one microbatch on one tp rank, under
    `granularity` (default: --recompute-granularity)."""
    m = cfg.model
    x = dims(cfg, device)
    if granularity == "":
        granularity = m.recompute_granularity
    if granularity == "full":
        return {"layer input (full recompute)": x.a * x.sl * x.b * x.h}
    sbh = x.s * x.b * x.h
    terms = {"2 norms": 2 * _norm_terms(cfg, x), "qkv + fc1 inputs": 2 * x.a * sbh}
    terms.update(_attention_terms(cfg, x, granularity == "selective"))
    fc1 = x.s * x.b * x.f
    if m.swiglu:  # fc1 output [gate; up], silu(gate), silu(gate) * up
        terms["mlp (swiglu)"] = 4 * x.a * fc1
    else:  # gelu input and output
        terms["mlp (gelu)"] = 2 * x.a * fc1
    if m.hidden_dropout > 0:
        terms["2 dropout masks"] = 2 * x.mask * x.sl * x.b * x.h
    return terms


def ring_bytes(cfg: Config) -> dict[str, int]:
    """Bytes one rank sends around its cp ring per layer and microbatch: K/V blocks cp - 1 times in
    the forward (again under full recompute) and in the backward, and the fp32 dK/dV cp times."""
    x = dims(cfg)
    if x.cp == 1:
        return {}
    kv = 2 * x.b * x.ng * x.s * x.d
    forwards = 2 if cfg.model.recompute_granularity == "full" else 1
    return {"k/v blocks": (forwards + 1) * (x.cp - 1) * x.a * kv, "dk/dv blocks": x.cp * 4 * kv}


def full_recompute_layers(cfg: Config, n_layers: int) -> tuple[int, int]:
    """(checkpointed groups, layers kept whole) of a chunk of `n_layers` under full recompute."""
    m = cfg.model
    n = m.recompute_num_layers
    if m.recompute_method == "uniform":
        return -(-n_layers // n), 0
    return min(n, n_layers), max(0, n_layers - n)


def embedding_terms(cfg: Config, device: str = "cuda") -> dict[str, int]:
    x = dims(cfg, device)
    out = {}
    if x.t > 1:  # local ids (int64) and the out-of-range mask (bool)
        out["vocab-parallel lookup"] = 9 * x.b * x.s
    if cfg.model.hidden_dropout > 0:
        out["embedding dropout mask"] = x.mask * x.sl * x.b * x.h
    return out


def output_terms(cfg: Config, padded_vocab: int) -> dict[str, int]:
    x = dims(cfg, "cuda")  # no dropout here: the device does not matter
    return {
        "final norm": _norm_terms(cfg, x),
        "output layer input": x.a * x.s * x.b * x.h,
        "fp32 softmax of the logits": 4 * x.s * x.b * (padded_vocab // x.t),
        "cross-entropy targets": 9 * x.s * x.b,
    }


def chunk_bytes(cfg: Config, padded_vocab: int, pp_rank: int, device: str = "cuda") -> list[int]:
    """One microbatch's saved bytes on each virtual chunk of pipeline rank `pp_rank`."""
    out = []
    per_layer = sum(layer_terms(cfg, device=device).values())
    pp, vpp = cfg.parallel.pipeline_model_parallel_size, cfg.virtual_pipeline_size or 1
    for layers, pre, post in stage_chunks(cfg.model.num_layers, pp, pp_rank, vpp):
        n = len(layers)
        if cfg.model.recompute_granularity == "full":
            groups, whole = full_recompute_layers(cfg, n)
            whole_bytes = sum(layer_terms(cfg, None, device).values())  # --recompute-method block
            total = groups * per_layer + whole * whole_bytes
        else:
            total = n * per_layer
        if pre:
            total += sum(embedding_terms(cfg, device).values())
        if post:
            total += sum(output_terms(cfg, padded_vocab).values())
        else:  # the chunk's output: the executor keeps it from F to B (the root of its backward)
            x = dims(cfg, device)
            total += x.a * x.sl * x.b * x.h
        out.append(total)
    return out


def korthikanti_layer(cfg: Config) -> dict[str, float]:
    """The paper's per-layer bytes (16-bit activations, dropout masks) for this layer's s, b, h, a, t
    (s: this rank's s / cp tokens under context parallelism)."""
    m, p = cfg.model, cfg.parallel
    s, b, h = m.seq_length // p.context_parallel_size, cfg.train.micro_batch_size, m.hidden_size
    a = m.num_attention_heads
    t = p.tensor_model_parallel_size
    sbh = s * b * h
    if m.recompute_granularity == "full":
        return {"layer input 2sbh": 2 * sbh / (t if p.sequence_parallel else 1)}
    attn = 0.0 if m.recompute_granularity == "selective" else 5 * a * s * s * b / t
    if p.sequence_parallel:
        return {"34 sbh / t": 34 * sbh / t, "5 a s^2 b / t": attn}
    return {"10 sbh": 10 * sbh, "24 sbh / t": 24 * sbh / t, "5 a s^2 b / t": attn}
