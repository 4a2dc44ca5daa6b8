"""Log-likelihood requests per second: megatron_lite's Scorer against transformers on the same model.

    .venv/bin/python bench/bench_eval.py                  # 4 layers, hidden 256, seq 256, vocab 8192
    .venv/bin/python bench/bench_eval.py --requests 512 --batch-size 16 --repeats 3

A random GPT-2-flavour model is saved as a megatron_lite checkpoint and exported to HF format;
both score the same (context, continuation) token requests (lengths 16..seq, continuations 1..8
tokens), in the same batches (sorted longest first, right-padded, `--batch-size` requests per
forward), fp32 on this machine's device, best of `--repeats` runs each, alternating. The
transformers side is what lm-eval's HF model does per batch: a forward, log_softmax over the
vocabulary, gather of the continuation tokens, greedy check. Also prints the largest difference
between the two sides' log-likelihoods.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from megatron_lite.checkpointing import save_checkpoint  # noqa: E402
from megatron_lite.checkpointing.hf_export import export_hf  # noqa: E402
from megatron_lite.checkpointing.hf_reader import open_checkpoint  # noqa: E402
from megatron_lite.config import Config, DataConfig, ModelConfig  # noqa: E402
from megatron_lite.data.tokenizer import NullTokenizer  # noqa: E402
from megatron_lite.evaluation.requests import Scorer  # noqa: E402
from megatron_lite.inference.generation import load_model  # noqa: E402
from megatron_lite.model import build_model_chunks  # noqa: E402
from megatron_lite.parallel_state import ParallelState  # noqa: E402


def build(d: str, layers: int, hidden: int, seq: int, vocab: int) -> tuple[str, str]:
    m = ModelConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=max(hidden // 64, 2),
        seq_length=seq, max_position_embeddings=seq,
    )  # fmt: skip
    cfg = Config(model=m, data=DataConfig(tokenizer_type="NullTokenizer", vocab_size=vocab - 1))
    cfg.finalize(1)
    ps = ParallelState.single()
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(vocab))
    save_checkpoint(os.path.join(d, "ckpt"), 1, chunks, None, None, cfg, ps, 0, vocab_size=vocab)
    export_hf(open_checkpoint(os.path.join(d, "ckpt")), os.path.join(d, "hf"), log=lambda s: None)
    return os.path.join(d, "ckpt"), os.path.join(d, "hf")


def requests(n: int, seq: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        total = int(torch.randint(16, seq + 1, (1,), generator=g))
        cont = int(torch.randint(1, 9, (1,), generator=g))
        toks = torch.randint(0, vocab - 1, (total,), generator=g).tolist()
        out.append((toks[: total - cont], toks[total - cont :]))
    return out


@torch.no_grad()
def transformers_scores(model, pairs, batch_size: int) -> list[float]:
    """lm-eval's HF loop: sorted longest first, right-padded batches, log_softmax, gather."""
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0] + pairs[i][1]))
    out = [0.0] * len(pairs)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        inputs = [(pairs[i][0] + pairs[i][1])[:-1] for i in idx]
        width = max(map(len, inputs))
        tokens = torch.zeros(len(idx), width, dtype=torch.long)
        for r, inp in enumerate(inputs):
            tokens[r, : len(inp)] = torch.tensor(inp)
        logp = model(tokens).logits.float().log_softmax(-1)
        for r, i in enumerate(idx):
            cont, n = torch.tensor(pairs[i][1]), len(inputs[r])
            piece = logp[r, n - len(cont) : n]
            out[i] = piece.gather(-1, cont[:, None]).sum().item()
            bool((piece.argmax(-1) == cont).all())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="Tiny sizes: only checks that it runs.")
    a = p.parse_args(argv)
    if a.smoke:
        a.layers, a.hidden, a.seq, a.vocab, a.requests, a.batch_size, a.repeats = (
            1,
            32,
            32,
            256,
            16,
            4,
            1,
        )
    import transformers

    with tempfile.TemporaryDirectory() as d:
        ckpt, hf = build(d, a.layers, a.hidden, a.seq, a.vocab)
        lm = load_model(ckpt, dtype=torch.float32)
        scorer = Scorer(lm, NullTokenizer(a.vocab - 1), a.batch_size)
        theirs_model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        theirs_model = theirs_model.to(next(lm.model.parameters()).device).eval()
        pairs = requests(a.requests, a.seq, a.vocab)
        best = {"megatron_lite": float("inf"), "transformers": float("inf")}
        for _ in range(a.repeats):  # alternate, so machine noise hits both alike
            t = time.perf_counter()
            ours = [ll for ll, _ in scorer.loglikelihood_tokens(pairs)]
            best["megatron_lite"] = min(best["megatron_lite"], time.perf_counter() - t)
            t = time.perf_counter()
            theirs = transformers_scores(theirs_model, pairs, a.batch_size)
            best["transformers"] = min(best["transformers"], time.perf_counter() - t)
    diff = max(abs(x - y) / abs(y) for x, y in zip(ours, theirs))
    print(
        f"log-likelihood requests: {a.requests} (context + continuation 16..{a.seq} tokens), "
        f"batch {a.batch_size}, {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}, fp32, "
        f"{torch.get_num_threads()} threads, best of {a.repeats}"
    )
    for name, secs in best.items():
        print(f"  {name:>14}: {a.requests / secs:8.1f} requests/s ({secs:.2f} s)")
    ratio = best["transformers"] / best["megatron_lite"]
    print(f"  ratio megatron_lite / transformers: {ratio:.2f}x; max relative difference {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
