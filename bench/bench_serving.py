"""Serving throughput: generated tokens/s of 1, 8 and 32 concurrent requests against one at a time.

    .venv/bin/python bench/bench_serving.py                  # 2 layers, hidden 64, 64 requests
    .venv/bin/python bench/bench_serving.py --layers 4 --hidden 256 --requests 128 --new-tokens 64

A random GPT-2-flavour model is saved as a megatron_lite checkpoint and loaded as the server loads
it. "one at a time" is what the server did before continuous batching: one `generate` call per
request, in turn. Then the same requests (prompts of 8..24 random tokens, greedy, `--new-tokens`
each unless the model ends the document first) go to POST /v1/completions of a `GenerationServer`
on 127.0.0.1 (`--inference-max-requests 32`) from 1, 8 and 32 client threads at once; tokens/s
counts the completion tokens the answers report over the wall time, best of `--repeats` runs
taken in turn. Figures on a 2-core CPU mostly
measure Python overhead per step, which is what batching shares out.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from megatron_lite.checkpointing import save_checkpoint  # noqa: E402
from megatron_lite.config import Config, DataConfig, ModelConfig  # noqa: E402
from megatron_lite.data.tokenizer import NullTokenizer  # noqa: E402
from megatron_lite.inference.generation import SamplingParams, generate, load_model  # noqa: E402
from megatron_lite.inference.server import GenerationServer  # noqa: E402
from megatron_lite.model import build_model_chunks  # noqa: E402
from megatron_lite.parallel_state import ParallelState  # noqa: E402


def build(d: str, layers: int, hidden: int, seq: int, vocab: int) -> str:
    m = ModelConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=max(hidden // 32, 2),
        seq_length=seq, max_position_embeddings=seq,
    )  # fmt: skip
    cfg = Config(model=m, data=DataConfig(tokenizer_type="NullTokenizer", vocab_size=vocab - 1))
    cfg.finalize(1)
    ps = ParallelState.single()
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(vocab))
    path = os.path.join(d, "ckpt")
    save_checkpoint(path, 1, chunks, None, None, cfg, ps, 0, vocab_size=vocab)
    return path


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (n,), generator=g).tolist()
    return [torch.randint(0, vocab - 1, (k,), generator=g).tolist() for k in lengths]


def one_at_a_time(lm, reqs: list[list[int]], new_tokens: int, eod: int) -> tuple[int, float]:
    """One `generate` per request, in turn, in a thread of its own as the engine's steps run
    (torch's CPU thread pool behaves differently on the main thread: like against like)."""
    out = []

    def run() -> None:
        t, tokens = time.perf_counter(), 0
        for p in reqs:
            tokens += len(
                generate(lm, p, new_tokens, SamplingParams(temperature=0), eod=eod).tokens
            )
        out.append((tokens, time.perf_counter() - t))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out[0]


def _complete(address, prompt: list[int], new_tokens: int) -> int:
    conn = http.client.HTTPConnection(*address, timeout=300)
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"the server answered {resp.status}: {out}")
    return out["usage"]["completion_tokens"]


def concurrent(address, reqs: list[list[int]], clients: int, new_tokens: int) -> tuple[int, float]:
    """`clients` threads, each sending its share of `reqs` one after another."""
    counts = [0] * clients

    def client(c: int) -> None:
        for p in reqs[c::clients]:
            counts[c] += _complete(address, p, new_tokens)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(counts), time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="Best of this many runs of each.")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (torchrun's: 1).")
    p.add_argument("--smoke", action="store_true", help="Tiny sizes: only checks that it runs.")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)  # more spin-wait for a shared CPU and make the figures noise
    if a.smoke:
        a.layers, a.hidden, a.requests, a.new_tokens, a.repeats = 1, 32, 32, 4, 1
    eod = a.vocab - 1
    with tempfile.TemporaryDirectory() as d:
        lm = load_model(build(d, a.layers, a.hidden, a.seq, a.vocab), dtype=torch.float32)
        reqs = prompts(a.requests, a.vocab)
        server = GenerationServer(lm, NullTokenizer(eod), "127.0.0.1", 0, max_batch_size=32,
                                  max_new_tokens=a.new_tokens)  # fmt: skip
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        runs = {"one at a time": lambda: one_at_a_time(lm, reqs, a.new_tokens, eod)}
        for clients in (1, 8, 32):
            runs[f"{clients} concurrent"] = functools.partial(
                concurrent, server.address, reqs, clients, a.new_tokens
            )
        results = {}
        try:
            for _ in range(a.repeats):  # in turn, so that a burst of machine load hits all alike
                for name, run in runs.items():
                    tokens, secs = run()
                    results[name] = min(results.get(name, (tokens, secs)), (tokens, secs),
                                        key=lambda r: r[1] / r[0])  # fmt: skip
        finally:
            server.shutdown()
            thread.join()
    print(
        f"serving: {a.requests} greedy requests (prompts 8..24 tokens, up to {a.new_tokens} new), "
        f"{a.layers} layers, hidden {a.hidden}, vocab {a.vocab}, fp32, "
        f"{torch.get_num_threads()} threads, best of {a.repeats}, POST /v1/completions on 127.0.0.1"
    )
    base_tokens, base_secs = results["one at a time"]
    for name, (tokens, secs) in results.items():
        ratio = (tokens / secs) / (base_tokens / base_secs)
        print(f"  {name:>14}: {tokens / secs:8.1f} tokens/s ({tokens} tokens, {secs:.2f} s), "
              f"ratio vs one at a time {ratio:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
