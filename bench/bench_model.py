"""Model benchmarks (CPU unless CUDA is present): fused softmax vs the torch path, and the GPT-2 flavour's
training throughput against a minimal plain-PyTorch GPT of the same shape.

    .venv/bin/python bench/bench_model.py                 # both parts
    .venv/bin/python bench/bench_model.py --part softmax  # or --part train; --steps N

Softmax: forward + backward of scale -> mask -> softmax (causal and padding masks), fused kernel vs
plain torch ops in autograd, on [8, 8, 512, 512] and [4, 16, 1024, 1024], fp32 and bf16.
Training: n_layer 4, n_head 4, hidden 256, seq 256, micro batch 8, vocab 50304, fp32, AdamW, dropout 0
in both models; steps of the models alternate so machine noise hits them alike; medians (and best
steps) reported. "auto" resolves to SDPA, the fastest here.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite import device as dev
from megatron_lite.config import Config, ModelConfig
from megatron_lite.model import build_model_chunks
from megatron_lite.model.fused_softmax import FusedScaleMaskSoftmax, torch_softmax
from megatron_lite.parallel_state import ParallelState

N_LAYER, N_HEAD, HIDDEN, SEQ, MICRO_BATCH, VOCAB = 4, 4, 256, 256, 8, 50304


def _median_time(fn, reps: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(reps):
        dev.synchronize(device)
        t = time.perf_counter()
        fn()
        dev.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


SOFTMAX_SHAPES = ((8, 8, 512, 512), (4, 16, 1024, 1024))
# --smoke: tiny shapes, to check the script runs (tests/test_bench_smoke.py); its figures mean nothing
SMOKE = {"SOFTMAX_SHAPES": ((2, 2, 32, 32),), "N_LAYER": 1, "N_HEAD": 2, "HIDDEN": 32, "SEQ": 32,
         "MICRO_BATCH": 2, "VOCAB": 512}  # fmt: skip


def bench_softmax(device: torch.device, reps: int = 5) -> None:
    print(f"fused scaled masked softmax, forward + backward, {device.type}, median of {reps}")
    print(f"{'shape':>22} {'dtype':>9} {'mask':>8} {'torch ms':>9} {'fused ms':>9} {'ratio':>6}")
    for shape in SOFTMAX_SHAPES:
        b, _, sq, sk = shape
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device=device).to(dtype)
            g = torch.randn(shape, device=device).to(dtype)
            for kind in ("causal", "padding"):
                mask = None
                if kind == "padding":
                    mask = torch.rand(b, 1, sq, sk, device=device) < 0.1
                module = FusedScaleMaskSoftmax(kind, fusion=True, scale=0.125)
                assert module.is_kernel_available(x, mask), "fused kernel not built: make build"

                def fused(x=x, mask=mask, module=module, g=g):
                    xi = x.detach().requires_grad_()
                    module(xi, mask).backward(g)

                def plain(x=x, mask=mask, kind=kind, g=g):
                    xi = x.detach().requires_grad_()
                    torch_softmax(xi, mask, 0.125, causal=kind == "causal").backward(g)

                t_fused = _median_time(fused, reps, device)
                t_plain = _median_time(plain, reps, device)
                print(
                    f"{str(list(shape)):>22} {str(dtype)[6:]:>9} {kind:>8} {t_plain * 1e3:9.1f} "
                    f"{t_fused * 1e3:9.1f} {t_plain / t_fused:6.2f}x"
                )


class MinimalGPT(nn.Module):
    """The reference: pre-LayerNorm GPT-2 with SDPA attention and tied embeddings, nothing else."""

    def __init__(self, vocab: int, seq: int, hidden: int, heads: int, layers: int):
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(seq, hidden)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(
                nn.ModuleDict(
                    dict(
                        ln1=nn.LayerNorm(hidden),
                        qkv=nn.Linear(hidden, 3 * hidden),
                        proj=nn.Linear(hidden, hidden),
                        ln2=nn.LayerNorm(hidden),
                        fc=nn.Linear(hidden, 4 * hidden),
                        out=nn.Linear(4 * hidden, hidden),
                    )
                )
            )
        self.ln_f = nn.LayerNorm(hidden)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, s = tokens.shape
        x = self.wte(tokens) + self.wpe(torch.arange(s, device=tokens.device))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).split(x.shape[-1], dim=-1)
            q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["proj"](y.transpose(1, 2).reshape(b, s, -1))
            x = x + blk["out"](F.gelu(blk["fc"](blk["ln2"](x))))
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


def _ours(backend: str, device: torch.device) -> nn.Module:
    cfg = Config(
        model=ModelConfig(
            num_layers=N_LAYER,
            hidden_size=HIDDEN,
            num_attention_heads=N_HEAD,
            seq_length=SEQ,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            attention_backend=backend,
        )
    )
    return build_model_chunks(cfg, ParallelState.single(), cfg.padded_vocab_size(VOCAB), device)[0]


def bench_train(device: torch.device, steps: int) -> None:
    torch.manual_seed(0)
    models = {"plain torch GPT": MinimalGPT(VOCAB, SEQ, HIDDEN, N_HEAD, N_LAYER).to(device)}
    for backend in ("auto", "fused", "sdpa", "unfused"):
        models[f"megatron_lite {backend}"] = _ours(backend, device)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step(name: str) -> float:
        model, opt = models[name], opts[name]
        dev.synchronize(device)
        t = time.perf_counter()
        if isinstance(model, MinimalGPT):
            loss = model(inputs, labels)
        else:
            loss = model(inputs, None, None, labels).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dev.synchronize(device)
        assert math.isfinite(loss.item())
        return time.perf_counter() - t

    times: dict[str, list[float]] = {k: [] for k in models}
    for name in models:  # warm-up (allocator, optimizer state)
        step(name)
    for _ in range(steps):
        for name in models:
            times[name].append(step(name))
    tokens_per_step = MICRO_BATCH * SEQ
    ref_med = statistics.median(times["plain torch GPT"])
    ref_best = min(times["plain torch GPT"])
    print(
        f"\ntraining step, {device.type}, {torch.get_num_threads()} threads, n_layer {N_LAYER} "
        f"n_head {N_HEAD} hidden {HIDDEN} seq {SEQ} micro batch {MICRO_BATCH} vocab {VOCAB}, "
        f"fp32 AdamW, {steps} steps each (median; best step in brackets: less noise on a busy host)"
    )
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        print(
            f"{name:>26}: {tokens_per_step / med:8.0f} tokens/s [{tokens_per_step / best:6.0f}]"
            f"   ratio vs plain {ref_med / med:5.2f} [{ref_best / best:5.2f}]"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["all", "softmax", "train"], default="all")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: only checks that it runs")
    args = ap.parse_args()
    if args.smoke:
        globals().update(SMOKE)
    device = dev.get_device()
    if args.part in ("all", "softmax"):
        bench_softmax(device)
    if args.part in ("all", "train"):
        bench_train(device, args.steps)


if __name__ == "__main__":
    main()
