"""Generation (megatron_lite/generation.py, tools/generate.py) and its HTTP server.

Small random GPT-2-flavour and Llama-flavour (GQA) models are saved as megatron_lite checkpoints and
exported to HF format; generation with the KV cache must equal full recomputation, greedy decoding
must equal `transformers`' on the export, tp / pp splits must equal one process, and the server must answer good
requests and refuse bad ones with a 4xx.
"""

import http.client
import json
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed as dist
from factory import tiny_config

from megatron_lite.checkpointing import save_checkpoint
from megatron_lite.checkpointing.hf_export import export_hf
from megatron_lite.checkpointing.hf_reader import open_checkpoint
from megatron_lite.data.tokenizer import NullTokenizer
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.inference.engine import Engine, Request
from megatron_lite.inference.generation import (
    SamplingParams,
    generate,
    generate_batch,
    load_model,
    sample,
)
from megatron_lite.inference.server import GenerationServer, follow, is_serving_rank
from megatron_lite.model import build_model_chunks
from megatron_lite.parallel_state import ParallelState

transformers = pytest.importorskip("transformers")  # the `hf` extra (installed by `make test`)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")  # compared with transformers on the CPU
VOCAB, EOD = 100, 99  # NullTokenizer(99): ids 0..98 and its end-of-document id 99
PROMPT = [5, 17, 42, 8, 3]
SAMPLED = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
FLAVOURS = {
    "gpt2": {},
    "llama": dict(
        swiglu=True,
        normalization="RMSNorm",
        position_embedding_type="rope",
        untie_embeddings_and_output_weights=True,
        add_bias_linear=False,
        group_query_attention=True,
        num_query_groups=2,
    ),
}


def _save(path, flavour):
    cfg = tiny_config(
        1, seq_length=32, make_vocab_size_divisible_by=16, vocab_size=EOD, **FLAVOURS[flavour]
    )
    ps = ParallelState.single()
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(VOCAB))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # away from the init: norms and biases matter too
        for p in chunks[0].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    save_checkpoint(str(path), 1, chunks, None, None, cfg, ps, 0, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{flavour: (checkpoint dir, HF export dir)}."""
    out = {}
    for flavour in FLAVOURS:
        d = tmp_path_factory.mktemp(flavour)
        _save(d / "ckpt", flavour)
        export_hf(open_checkpoint(str(d / "ckpt")), str(d / "hf"), log=lambda s: None)
        out[flavour] = (str(d / "ckpt"), str(d / "hf"))
    return out


@pytest.fixture(scope="module")
def lms(models):
    return {f: load_model(ck, dtype=torch.float32, device=CPU) for f, (ck, _) in models.items()}


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_kv_cache_generation_equals_full_recomputation(lms, flavour):
    lm = lms[flavour]
    greedy = SamplingParams(temperature=0)
    a = generate(lm, PROMPT, 20, greedy, return_logits=True)
    b = generate(lm, PROMPT, 20, greedy, use_cache=False, return_logits=True)
    assert a.tokens == b.tokens and len(a.tokens) == 20
    diff = max((x - y).abs().max().item() for x, y in zip(a.step_logits, b.step_logits))
    assert diff < 1e-5
    s1 = generate(lm, PROMPT, 20, SAMPLED, seed=5)
    s2 = generate(lm, PROMPT, 20, SAMPLED, seed=5, use_cache=False)
    assert s1.tokens == s2.tokens
    assert generate(lm, PROMPT, 20, SAMPLED, seed=6).tokens != s1.tokens  # the seed matters


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_greedy_output_equals_transformers_greedy_on_the_export(models, lms, flavour):
    model = transformers.AutoModelForCausalLM.from_pretrained(models[flavour][1])
    with torch.no_grad():
        out = model.eval().generate(
            torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, pad_token_id=EOD
        )
    theirs = out[0, len(PROMPT) :].tolist()
    ours = generate(lms[flavour], PROMPT, 16, SamplingParams(temperature=0), eod=EOD).tokens
    assert ours == theirs
    hf_lm = load_model(
        models[flavour][1], dtype=torch.float32, device=CPU
    )  # our model on the HF files
    assert generate(hf_lm, PROMPT, 16, SamplingParams(temperature=0), eod=EOD).tokens == ours


def _split_generate(paths, layouts):
    """Greedy and sampled tokens of every model at each (tp, pp) layout of this world, in order."""
    out = []
    for tp, pp in layouts:
        ps = ParallelState.build(tp, pp)
        for path in paths:
            lm = load_model(path, ps, dtype=torch.float32, device=CPU)
            greedy = generate(lm, PROMPT, 12, SamplingParams(temperature=0)).tokens
            out.append((greedy, generate(lm, PROMPT, 12, SAMPLED, seed=3).tokens))
    return out


def test_tensor_and_pipeline_parallel_generation_equal_single_process(models, lms):
    """tp 2, pp 2 and tp 2 x pp 2 (hidden states sent stage to stage, the tied embedding's copy on
    the last stage, the token broadcast from it) give one process's tokens, for both flavours."""
    want = [
        (
            generate(lms[f], PROMPT, 12, SamplingParams(temperature=0)).tokens,
            generate(lms[f], PROMPT, 12, SAMPLED, seed=3).tokens,
        )
        for f in FLAVOURS
    ]
    paths = [models[f][0] for f in FLAVOURS]
    for got in run_distributed(_split_generate, 2, paths, [(2, 1), (1, 2)], timeout=120):
        assert got == want * 2
    for got in run_distributed(_split_generate, 4, paths, [(2, 2)], timeout=120):
        assert got == want


def test_sampling_filters_keep_only_the_allowed_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=0), g).item() == 1
    assert sample(logits, SamplingParams(top_k=1), g).item() == 1
    top3 = {sample(logits, SamplingParams(top_k=3), g).item() for _ in range(200)}
    assert top3 == {1, 3, 5}
    # probabilities of 1, 5, 3 are ~0.37, 0.33, 0.22: top_p 0.6 keeps the first two only
    nucleus = {sample(logits, SamplingParams(top_p=0.6), g).item() for _ in range(200)}
    assert nucleus == {1, 5}
    hot = {sample(logits, SamplingParams(temperature=50.0), g).item() for _ in range(300)}
    assert len(hot) == 6  # a high temperature flattens the distribution
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_generation_stops_at_end_of_document_and_checks_lengths(lms):
    lm = lms["gpt2"]
    first = generate(lm, PROMPT, 3, SamplingParams(temperature=0)).tokens[0]
    out = generate(lm, PROMPT, 10, SamplingParams(temperature=0), eod=first)
    assert (out.tokens, out.finish_reason) == ([first], "eod")
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        generate(lm, PROMPT, 30)
    with pytest.raises(ValueError, match="token ids"):
        generate(lm, [VOCAB + 5], 3)


def _request(address, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection(*address, timeout=20)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, payload = resp.status, json.loads(resp.read())
    conn.close()
    return status, payload


def test_server_answers_a_request_and_rejects_malformed_ones(lms):
    lm, tok = lms["gpt2"], NullTokenizer(EOD)
    server = GenerationServer(lm, tok, "127.0.0.1", 0, max_request_bytes=2048, max_new_tokens=8)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        addr = server.address
        assert addr[0] == "127.0.0.1"
        good = {"prompt": "5 17 42 8 3", "max_new_tokens": 6, "temperature": 0}
        status, out = _request(addr, "POST", "/generate", good)
        want = generate(lm, PROMPT, 6, SamplingParams(temperature=0), eod=EOD)
        assert status == 200 and out["tokens"] == want.tokens
        assert out["completion"] == tok.detokenize([t for t in want.tokens if t != EOD])
        assert _request(addr, "GET", "/health") == (200, {"status": "ok"})
        bad = [
            (400, "not valid JSON", None, b"{not json"),
            (400, "'prompt' is required", {}, None),
            (400, "'prompt' is required", {"prompt": 7}, None),
            (400, "temperature", {"prompt": "1 2", "temperature": -1}, None),
            (400, "top_p", {"prompt": "1 2", "top_p": "x"}, None),
            (400, "max_new_tokens", {"prompt": "1 2", "max_new_tokens": 9}, None),
            (400, "unknown field", {"prompt": "1 2", "bogus": 1}, None),
            (400, "cannot be tokenized", {"prompt": "one two"}, None),
            (413, "over the limit of 31", {"prompt": " ".join(["1"] * 40)}, None),
            (413, "request body", None, b" " * 3000),
        ]
        for code, message, body, raw in bad:
            status, out = _request(addr, "POST", "/generate", body, raw)
            assert status == code and message in out["error"], (code, message, status, out)
        assert _request(addr, "GET", "/generate")[0] == 405
        assert _request(addr, "POST", "/other", good)[0] == 404
        assert _request(addr, "POST", "/generate", good)[0] == 200  # still serving
    finally:
        server.shutdown()
        thread.join(timeout=10)
    assert not thread.is_alive()


def _serve_split_model(path):
    """pp = 2: the first rank serves one request over HTTP, the other follows; both stop."""
    ps = ParallelState.build(1, 2)
    lm, tok = load_model(path, ps, dtype=torch.float32, device=CPU), NullTokenizer(EOD)
    if not is_serving_rank(ps):
        follow(lm, tok)
        return None
    server = GenerationServer(lm, tok, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        body = {"prompt": "5 17 42 8 3", "max_new_tokens": 6, "temperature": 0}
        return _request(server.address, "POST", "/generate", body)
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_server_over_two_pipeline_stages_answers_as_one_process(models, lms):
    served, followed = run_distributed(_serve_split_model, 2, models["gpt2"][0], timeout=120)
    want = generate(lms["gpt2"], PROMPT, 6, SamplingParams(temperature=0), eod=EOD)
    assert followed is None and served[0] == 200 and served[1]["tokens"] == want.tokens


@pytest.mark.slow
def test_generate_cli_prints_the_greedy_completion(models, lms):
    cmd = [sys.executable, str(ROOT / "tools/generate.py"), "--load", models["llama"][0]]
    cmd += ["--prompt", "5 17 42 8 3", "--greedy", "--max-new-tokens", "6", "--dtype", "fp32"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    want = generate(lms["llama"], PROMPT, 6, SamplingParams(temperature=0), eod=EOD)
    assert result["tokens"] == want.tokens
    assert result["finish_reason"] == want.finish_reason
    # the same under torchrun with two pipeline stages; a stage count that does not divide the
    # ranks is refused
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run(
        [*torchrun, *cmd[1:], "--pipeline-model-parallel-size", "2"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["tokens"] == want.tokens
    bad = subprocess.run(
        [*cmd, "--pipeline-model-parallel-size", "3"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "--pipeline-model-parallel-size (3) must divide" in bad.stderr


def test_server_answers_20_concurrent_clients_while_one_is_stalled_mid_body(lms):
    import socket

    lm, tok = lms["gpt2"], NullTokenizer(EOD)
    server = GenerationServer(lm, tok, "127.0.0.1", 0, socket_timeout=60)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stalled = socket.create_connection(server.address, timeout=60)
    try:
        # headers and half the body, then nothing: the old one-at-a-time server waited on it
        stalled.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n" + b'{"prompt": '
        )
        start, results = threading.Barrier(20), []
        body = {"prompt": "5 17 42", "max_new_tokens": 2, "temperature": 0}

        def client():
            start.wait()  # all 20 connect at once (the listen backlog was 5)
            try:
                results.append(_request(server.address, "POST", "/generate", body))
            except OSError as e:  # e.g. ConnectionResetError
                results.append((None, repr(e)))

        clients = [threading.Thread(target=client) for _ in range(20)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=50)
        want = generate(lm, [5, 17, 42], 2, SamplingParams(temperature=0), eod=EOD).tokens
        assert len(results) == 20 and all(s == 200 and r["tokens"] == want for s, r in results)
        stalled.setblocking(False)  # all answered while the stalled request is still unanswered
        with pytest.raises(BlockingIOError):
            stalled.recv(1)
    finally:
        stalled.close()
        server.shutdown()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_server_answers_408_to_a_body_that_never_arrives(lms):
    import socket

    server = GenerationServer(lms["gpt2"], NullTokenizer(EOD), "127.0.0.1", 0, socket_timeout=0.5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(server.address, timeout=20) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{")
            reply = s.makefile("rb").read()
        assert reply.startswith(b"HTTP/1.0 408") and b"not received within 0.5 s" in reply
    finally:
        server.shutdown()
        thread.join(timeout=10)


BATCH_PROMPTS = [PROMPT, [7, 1], [3, 9, 27, 81 % EOD, 43, 29, 87, 61, 83, 49, 47], [11]]


def _one_at_a_time(lm, params, seeds):
    return [
        generate(lm, p, 10, params, eod=EOD, seed=s).tokens for p, s in zip(BATCH_PROMPTS, seeds)
    ]


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_a_batch_of_prompts_of_different_lengths_gives_each_prompts_own_tokens(lms, flavour):
    """Left-padded prompts (learned positions shifted per sequence; rotary ones need no shift) in
    one KV-cached batch: greedy and seeded sampling give what one generate per prompt gives."""
    lm, seeds = lms[flavour], [3, 4, 5, 6]
    for params in (SamplingParams(temperature=0), SAMPLED):
        batch = generate_batch(lm, BATCH_PROMPTS, 10, params, eod=EOD, seeds=seeds)
        assert [o.tokens for o in batch] == _one_at_a_time(lm, params, seeds), (flavour, params)
    stopped = generate_batch(
        lm, BATCH_PROMPTS, 10, eod=EOD, stop=lambda i, new: i == 1 and len(new) == 2
    )
    assert len(stopped[1].tokens) == 2 and stopped[1].finish_reason == "stop"


def _argmax_loop(lm, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the plain way: the whole sequence through the model each step, no cache."""
    seq, ps = list(prompt), lm.ps
    for _ in range(n):
        logits = lm.logits(torch.tensor([seq]))  # [1, s, vocab] on the last stage, else None
        token = torch.zeros(1, dtype=torch.long) if logits is None else logits[0, -1].argmax()[None]
        if ps.tp_size * ps.pp_size > 1:  # the last stage's first rank tells the model's ranks
            dist.broadcast(token, ps.mp_ranks[(ps.pp_size - 1) * ps.tp_size], ps.mp_group)
        seq.append(int(token))
    return seq[len(prompt) :]


def _served(lm, params, seeds) -> list[list[int]] | None:
    """BATCH_PROMPTS through the serving engine, 3 rows for 4 requests (the last joins a running
    batch); the ranks that follow it return None."""
    if lm.ps.tp_size * lm.ps.pp_size > 1 and not is_serving_rank(lm.ps):
        return follow(lm, max_batch_size=3)
    engine = Engine(lm, max_batch_size=3)
    outs = engine.run([Request(p, 10, params, seed=s) for p, s in zip(BATCH_PROMPTS, seeds)])
    engine.stop()  # and the followers
    return [o.tokens for o in outs]


def _every_path(lm) -> dict:
    """Tokens of BATCH_PROMPTS from generate, generate_batch and the engine, greedy and seeded,
    and from the plain greedy loop."""
    seeds, out = [3, 4, 5, 6], {}
    for name, params in (("greedy", SamplingParams(temperature=0)), ("sampled", SAMPLED)):
        out[name, "generate"] = [generate(lm, p, 10, params, seed=s).tokens
                                 for p, s in zip(BATCH_PROMPTS, seeds)]  # fmt: skip
        batch = generate_batch(lm, BATCH_PROMPTS, 10, params, seeds=seeds)
        out[name, "batch"] = [o.tokens for o in batch]
        out[name, "engine"] = _served(lm, params, seeds)
    out["greedy", "argmax"] = [_argmax_loop(lm, p, 10) for p in BATCH_PROMPTS]
    return out


def _split_batches(paths, tp, pp):
    ps = ParallelState.build(tp, pp)
    out = []
    for p in paths:
        lm = load_model(p, ps, dtype=torch.float32, device=CPU)
        batch = generate_batch(lm, BATCH_PROMPTS, 10, SAMPLED, eod=EOD, seeds=[3, 4, 5, 6])
        out.append(([o.tokens for o in batch], _every_path(lm)))
    return out


@pytest.mark.slow
def test_batched_generation_at_tp2_pp2_equals_one_process(models, lms):
    """tp 2 x pp 2 batches give one process's tokens; at both layouts generate, generate_batch and
    the serving engine (one decode step under all three) agree, greedy and seeded, and greedy
    tokens are those of a plain argmax loop over the model without a KV cache."""
    want = [_one_at_a_time(lms[f], SAMPLED, [3, 4, 5, 6]) for f in FLAVOURS]
    paths = [models[f][0] for f in FLAVOURS]
    results = run_distributed(_split_batches, 4, paths, 2, 2, timeout=180)
    for got in results:
        assert [batch for batch, _ in got] == want
    for flavour, (_, split) in zip(FLAVOURS, results[0]):  # rank 0 served the engine's requests
        one = _every_path(lms[flavour])
        for paths_ in (one, split):
            for name in ("greedy", "sampled"):
                ways = [paths_[name, way] for way in ("generate", "batch", "engine")]
                assert ways[0] == ways[1] == ways[2], (flavour, name, ways)
            assert paths_["greedy", "argmax"] == paths_["greedy", "generate"], flavour
        assert split == one, flavour


def _sequence_parallel_tokens(paths):
    """Tokens of the same weights built with --sequence-parallel at tp 2 (each step padded to a
    multiple of tp), next to the plain tp 2 model's."""
    import copy
    import dataclasses

    from megatron_lite.model import GPTModel

    ps, out = ParallelState.build(2, 1), []
    for path in paths:
        lm = load_model(path, ps, dtype=torch.float32, device=CPU)
        cfg = copy.deepcopy(lm.cfg)
        cfg.parallel.sequence_parallel = True
        m = lm.model
        model = GPTModel(cfg, ps, m.columns * 2, m.layer_numbers, vocab_size=lm.vocab_size)
        model.load_state_dict(m.state_dict())
        sp = dataclasses.replace(lm, model=model.eval(), cfg=cfg)
        for one in (lm, sp):
            out.append(
                (
                    generate(one, PROMPT, 9, SAMPLED, seed=2).tokens,
                    [o.tokens for o in generate_batch(one, BATCH_PROMPTS, 9, seeds=[1, 2, 3, 4])],
                )
            )
    return out


@pytest.mark.slow
def test_sequence_parallel_generation_gives_the_plain_models_tokens(models):
    paths = [models[f][0] for f in FLAVOURS]
    for got in run_distributed(_sequence_parallel_tokens, 2, paths, timeout=120):
        assert got[0] == got[1] and got[2] == got[3]
