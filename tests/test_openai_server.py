"""Continuous batching (inference/engine.py) and the OpenAI-compatible server (openai_api.py).

The engine must give every request the tokens one `generate` call gives it, while requests join
and leave the running batch; the official `openai` client must complete and stream against the
server on 127.0.0.1; 16 concurrent clients must get the one-at-a-time greedy answers; the server
split over 2 gloo ranks (tp 2, then pp 2) and 4 (tp 2 x pp 2) must answer as one process. No
timings are asserted.
"""

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest
import torch
from factory import tiny_config

from megatron_lite.checkpointing import save_checkpoint
from megatron_lite.data.chat import ChatFormat
from megatron_lite.data.tokenizer import NullTokenizer
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.inference.engine import Engine, Request
from megatron_lite.inference.generation import SamplingParams, generate, load_model
from megatron_lite.inference.openai_api import TextStream
from megatron_lite.inference.server import GenerationServer, follow, is_serving_rank
from megatron_lite.inference.validation import RequestError, parse_request
from megatron_lite.model import build_model_chunks
from megatron_lite.parallel_state import ParallelState

CPU = torch.device("cpu")
VOCAB, EOD = 100, 99  # NullTokenizer(99): text is space-separated ids, 99 ends a document
GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9)
FLAVOURS = {
    "gpt2": {},  # learned positions: each row's own positions matter
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
# --window-size 5,0: each query sees itself and 5 keys before it (rows of different lengths must
# each keep their own window)
FLAVOURS["window"] = dict(FLAVOURS["llama"], window_size=[5, 0])
CHAT = [{"role": "user", "content": "5 17 42"}]


def _save(path, flavour, vocab=VOCAB):
    cfg = tiny_config(1, seq_length=48, vocab_size=vocab - 1, **FLAVOURS[flavour])
    ps = ParallelState.single()
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(vocab))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the init, so that greedy answers differ per prompt
        for p in chunks[0].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    save_checkpoint(str(path), 1, chunks, None, None, cfg, ps, 0, vocab_size=vocab)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    for f in FLAVOURS:
        _save(d / f, f)
    return {f: str(d / f) for f in FLAVOURS}


@pytest.fixture(scope="module")
def lms(paths):
    return {f: load_model(p, dtype=torch.float32, device=CPU) for f, p in paths.items()}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 14, (n,), generator=g).tolist()
    return [torch.randint(0, EOD, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_requests_joining_a_running_batch_get_their_one_at_a_time_tokens(lms, flavour):
    """12 prompts of 1..13 tokens through 5 rows: newcomers join between decode steps as rows
    free up (prefilled together, right-padded); greedy and seeded sampling give each request
    what `generate` alone gives."""
    lm, prompts = lms[flavour], _prompts(12)
    budgets = [4 + i % 9 for i in range(12)]  # different lengths: rows free at different steps
    for params in (GREEDY, SAMPLED):
        want = [generate(lm, p, n, params, eod=EOD, seed=i).tokens
                for i, (p, n) in enumerate(zip(prompts, budgets))]  # fmt: skip
        engine = Engine(lm, max_batch_size=5)
        reqs = [engine.submit(Request(p, n, params, seed=i, eod=EOD))
                for i, (p, n) in enumerate(zip(prompts, budgets))]  # fmt: skip
        engine.run_until_idle()
        assert [r.result().tokens for r in reqs] == want, params
        assert engine.steps["admitted"] == 12 and engine.steps["peak_batch"] == 5
        assert engine.steps["prefill"] < 12  # newcomers of one round were prefilled together
        assert engine.steps["decode"] < sum(budgets) - 12  # decode steps were shared
    engine = Engine(lm, max_batch_size=2)
    stopped = engine.submit(Request(prompts[0], 10, GREEDY, stop=lambda new: len(new) == 3))
    cancelled = engine.submit(Request(prompts[1], 10, GREEDY))
    cancelled.cancel()  # the client went away: it leaves after its first step
    engine.run_until_idle()
    assert (len(stopped.tokens), stopped.finish_reason) == (3, "stop")
    assert (len(cancelled.tokens), cancelled.finish_reason) == (1, "cancelled")
    with pytest.raises(ValueError, match="exceeds the model's 48 positions"):
        engine.submit(Request(prompts[0], 48, GREEDY))


class _Pieces:
    """A tokenizer whose ids are text pieces; id 3 and 4 are the two halves of one character."""

    PIECES = ["Hel", "lo", " wor", "\xe2", "\x82\xac", "ld", "!"]

    def detokenize(self, ids):
        raw = "".join(self.PIECES[i] for i in ids).encode("latin-1")
        return raw.decode("utf-8", errors="replace")  # half a character -> U+FFFD


def test_streamed_text_holds_back_what_may_still_change():
    text = TextStream(_Pieces(), ["ld!"], hidden={6})
    deltas = [text.delta([0, 1, 2, 3, 4, 5, 6][: n + 1]) for n in range(6)]
    # what may begin the stop string ("l", "ld") waits, and so does half of the euro sign
    assert deltas == ["He", "llo", " wor", "", "\u20ac", ""]
    assert text.delta([0, 1, 2, 3, 4, 5], final=True) == "ld"
    assert text.stopped([0, 1, 6]) and not text.stopped([0, 1])  # a hidden (stop) id
    cut = TextStream(_Pieces(), ["ld!"], hidden=set())
    assert cut.text([0, 1, 2, 5, 6]) == ("Hello wor", True)  # the stop string and what follows go
    assert cut.stopped([0, 1, 2, 5, 6])


class _Serving:
    """A GenerationServer in a thread, and an openai client for it."""

    def __init__(self, lm, tokenizer=None, **kwargs):
        tokenizer = tokenizer or NullTokenizer(EOD)
        self.server = GenerationServer(lm, tokenizer, "127.0.0.1", 0, **kwargs)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        host, port = self.server.address
        self.url = f"http://{host}:{port}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=60)

    def close(self):
        self.server.shutdown()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive()


def _text(tokens: list[int]) -> str:
    return NullTokenizer(EOD).detokenize([t for t in tokens if t != EOD])


def _expected_chat(lm, max_tokens, params=GREEDY, seed=0):
    prompt = ChatFormat.for_tokenizer(NullTokenizer(EOD)).encode(CHAT, True)[0]
    return generate(lm, prompt, max_tokens, params, eod=EOD, seed=seed)


def _stream_chat(client, model, messages=CHAT, **kwargs) -> tuple[str, str | None]:
    pieces, reason = [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True,
                                                **kwargs):  # fmt: skip
        pieces.append(chunk.choices[0].delta.content or "")
        reason = chunk.choices[0].finish_reason or reason
    return "".join(pieces), reason


def test_openai_client_completes_and_streams_a_chat(lms):
    lm = lms["llama"]
    serving = _Serving(lm)
    try:
        client, model = serving.client(), serving.server.limits["model"]
        assert serving.server.address[0] == "127.0.0.1"
        assert [m.id for m in client.models.list().data] == [model] == ["llama"]
        out = client.completions.create(model=model, prompt="5 17 42 8 3", max_tokens=9,
                                        temperature=0)  # fmt: skip
        want = generate(lm, [5, 17, 42, 8, 3], 9, GREEDY, eod=EOD)
        assert out.choices[0].text == _text(want.tokens)
        assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == len(want.tokens)
        chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12,
                                              temperature=0)  # fmt: skip
        want = _expected_chat(lm, 12)
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == _text(want.tokens)
        assert chat.choices[0].finish_reason == ("length" if want.finish_reason == "length"
                                                 else "stop")  # fmt: skip
        streamed, reason = _stream_chat(client, model, max_tokens=12, temperature=0)
        assert (streamed, reason) == (
            chat.choices[0].message.content,
            chat.choices[0].finish_reason,
        )
        chunks = list(client.completions.create(model=model, prompt="5 17 42 8 3", max_tokens=9,
                      temperature=0, stream=True, stream_options={"include_usage": True}))  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks[:-1]) == out.choices[0].text
        assert chunks[-1].choices == [] and chunks[-1].usage == out.usage
        sampled = _expected_chat(lm, 12, SAMPLED, seed=7)
        got = _stream_chat(client, model, max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
        assert got[0] == _text(sampled.tokens)
        # a stop string: the text before its first occurrence, streamed or not
        full = _text(want.tokens)
        stop = " " + full.split()[3]
        cut = full[: full.find(stop)]
        chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12,
                                              temperature=0, stop=[stop])  # fmt: skip
        assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (cut, "stop")
        assert _stream_chat(client, model, max_tokens=12, temperature=0, stop=stop) == (cut, "stop")
    finally:
        serving.close()


# ChatML-like, and strict the way many models' templates are
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _byte_level_tokenizer(d):
    """A byte-level BPE HuggingFaceTokenizer (256 bytes, one merge, <|endoftext|>) with
    STRICT_TEMPLATE as its chat template."""
    import json

    import transformers

    from megatron_lite.data.tokenizer import HuggingFaceTokenizer, bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + ["he", "<|endoftext|>"])}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\nh e\n")
    transformers.GPT2TokenizerFast.from_pretrained(str(d)).save_pretrained(str(d / "tok"))
    tok = HuggingFaceTokenizer(str(d / "tok"))
    tok.hf.chat_template = STRICT_TEMPLATE
    return tok


def test_a_tokenizers_own_chat_template_is_applied_and_its_refusals_are_400s(tmp_path):
    """Byte-level BPE: the answer is the template's prompt through `generate`, and the streamed
    text (random bytes: characters split over tokens, invalid ones) joins to the same text."""
    tok = _byte_level_tokenizer(tmp_path)
    _save(tmp_path / "bpe", "llama", vocab=tok.vocab_size)
    lm = load_model(str(tmp_path / "bpe"), dtype=torch.float32, device=CPU)
    messages = [{"role": "user", "content": "h\u00e9\u20ac"}]
    prompt = ChatFormat.for_tokenizer(tok).encode(messages, add_generation_prompt=True)[0]
    assert prompt == tok.hf.encode("<|user|>h\u00e9\u20ac<|endoftext|><|assistant|>")
    want = generate(lm, prompt, 16, GREEDY, eod=tok.eod)
    serving = _Serving(lm, tok)
    try:
        client = serving.client()
        chat = client.chat.completions.create(model="bpe", messages=messages, max_tokens=16,
                                              temperature=0)  # fmt: skip
        text = tok.detokenize([t for t in want.tokens if t != tok.eod])
        assert chat.choices[0].message.content == text
        assert _stream_chat(client, "bpe", messages, max_tokens=16, temperature=0)[0] == text
        with pytest.raises(openai.BadRequestError, match="roles must alternate"):
            client.chat.completions.create(model="bpe", messages=[{"role": "assistant",
                                           "content": "hi"}])  # fmt: skip
    finally:
        serving.close()


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_poison_request_fails_alone_and_every_endpoint_answers_after_it(lms):
    """temperature 1e-40 once gave NaN probabilities, killed the engine thread and 503'd everything
    after; a 30,000-deep array and a 5,000-digit seed got 503 and a dropped connection."""
    serving = _Serving(lms["gpt2"], max_new_tokens=20)
    try:
        client, model, url = serving.client(), serving.server.limits["model"], serving.url
        tiny = client.completions.create(model=model, prompt="1 2", max_tokens=4, temperature=1e-40)
        greedy = client.completions.create(model=model, prompt="1 2", max_tokens=4, temperature=0)
        assert tiny.choices[0].text == greedy.choices[0].text  # a tiny temperature is greedy
        deep = b'{"prompt": "1", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}"
        for path in ("/completions", "/chat/completions"):
            status, body = _post(url + path, deep)
            assert status == 400 and "nested too deep" in body["error"]["message"], body
        long_seed = b'{"prompt": "1 2", "seed": ' + b"7" * 5000 + b"}"
        status, body = _post(url + "/completions", long_seed)
        assert status == 400 and "'seed'" in body["error"]["message"], body
        assert "integer of 5000 digits" in body["error"]["message"]
        generate_url = url.removesuffix("/v1") + "/generate"
        status, body = _post(generate_url, long_seed)
        assert status == 400 and "seed must be an integer" in body["error"], body
        status, body = _post(generate_url, b'{"prompt": "1 2", "max_new_tokens": 3}')
        assert status == 200, body
        # every endpoint still answers
        assert client.completions.create(model=model, prompt="1 2", max_tokens=2).usage
        assert _stream_chat(client, model, max_tokens=3, temperature=1e-30)[0]
        assert [m.id for m in client.models.list()] == [model]
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=60) as r:
            assert json.loads(r.read()) == {"status": "ok"}
    finally:
        serving.close()


def test_a_failed_step_fails_only_its_requests(lms):
    engine = Engine(lms["gpt2"], max_batch_size=2)
    real = engine.core.step
    engine.core.step = lambda plan: (_ for _ in ()).throw(RuntimeError("boom"))
    bad = engine.submit(Request([1, 2], 3, GREEDY))
    engine.run_until_idle()
    with pytest.raises(RuntimeError, match="generation failed: boom"):
        bad.result(timeout=5)
    engine.core.step = real
    good = engine.submit(Request([1, 2], 3, GREEDY))
    engine.run_until_idle()
    assert good.result(timeout=5).tokens == generate(lms["gpt2"], [1, 2], 3, GREEDY).tokens


def test_every_route_and_generate_refuse_through_one_validator(lms):
    """/generate, /v1/completions, /v1/chat/completions and generate() share one validator and one
    error type: one fault gets one status, naming the field, from each."""
    lm, tok = lms["gpt2"], NullTokenizer(EOD)
    server = GenerationServer(lm, tok, "127.0.0.1", 0, max_new_tokens=20)
    server.httpd.server_close()
    long = " ".join(["1"] * 40)
    faults = {  # route: (body of a prompt too long for its budget, body with a negative seed)
        "generate": ({"prompt": long, "max_new_tokens": 10}, {"prompt": "1 2", "seed": -1}),
        "completion": ({"prompt": long, "max_tokens": 10}, {"prompt": "1 2", "seed": -1}),
        "chat": (None, {"messages": CHAT, "seed": -1}),
    }
    for kind, bodies in faults.items():
        for body, status, param in zip(bodies, (400, 400), ("max_", "seed")):
            if body is None:
                continue
            with pytest.raises(RequestError) as e:
                parse_request(json.dumps(body).encode(), kind, tok, server.chat, server.limits)
            assert e.value.status == status and e.value.param.startswith(param), (kind, e.value)
            if param == "max_":
                assert "exceeds the model's 48 positions" in str(e.value)
    with pytest.raises(RequestError, match="exceeds the model's 48 positions"):
        generate(lm, [1] * 40, 10)
    ours = parse_request(b'{"prompt": "5 17 42", "seed": 3}', "generate", tok, None, server.limits)
    theirs = parse_request(b'{"prompt": "5 17 42", "seed": 3}', "completion", tok, None,
                           server.limits)  # fmt: skip
    assert (ours.prompt, ours.seed, ours.params) == (theirs.prompt, theirs.seed, theirs.params)


def test_refused_requests_name_the_field(lms):
    serving = _Serving(lms["gpt2"], max_new_tokens=20)
    try:
        client, model = serving.client(), serving.server.limits["model"]
        bad = [
            (dict(n=2), "'n' = 2 is not supported"),
            (dict(logprobs=True), "'logprobs'"),
            (dict(presence_penalty=0.5), "'presence_penalty'"),
            (dict(max_tokens=21), "'max_tokens' must be an integer in [1, 20]"),
            (dict(temperature=-1), "temperature must be a number in [0, 100]"),
            (dict(stop=["a", "b", "c", "d", "e"]), "at most 4"),
            (dict(extra_body={"bogus": 1}), "unknown field(s) ['bogus']"),
            (dict(messages=[{"role": "robot", "content": "1"}]), "role 'robot'"),
        ]
        for kwargs, message in bad:
            kwargs = {"messages": CHAT, **kwargs}
            with pytest.raises(openai.BadRequestError, match=None) as e:
                client.chat.completions.create(model=model, **kwargs)
            assert message in e.value.body["message"], (kwargs, e.value.body)
        with pytest.raises(openai.BadRequestError, match="several requests"):
            client.completions.create(model=model, prompt=["1 2", "3 4"])
        with pytest.raises(openai.BadRequestError, match="'echo'"):
            client.completions.create(model=model, prompt="1 2", echo=True)
        with pytest.raises(openai.BadRequestError, match="exceeds the model's 48 positions"):
            client.completions.create(model=model, prompt=" ".join(["1"] * 40), max_tokens=10)
        with pytest.raises(openai.NotFoundError, match="serves 'gpt2'"):
            client.completions.create(model="gpt-4", prompt="1 2")
        ok = client.completions.create(model=model, prompt="1 2", max_tokens=2)  # still serving
        assert ok.usage.completion_tokens == 2
    finally:
        serving.close()


def _complete(client, model: str, text: str, max_tokens: int, stream: bool) -> str:
    kwargs = dict(model=model, prompt=text, max_tokens=max_tokens, temperature=0)
    if stream:
        return "".join(
            ch.choices[0].text for ch in client.completions.create(stream=True, **kwargs)
        )
    return client.completions.create(**kwargs).choices[0].text


def _concurrently(serving, model: str, prompts: list[list[int]], budgets: list[int]) -> list[str]:
    """Each prompt from its own thread and client, all released at once; odd ones stream."""
    got, start = [None] * len(prompts), threading.Barrier(len(prompts))

    def client(i):
        c = serving.client()
        start.wait()
        got[i] = _complete(c, model, " ".join(map(str, prompts[i])), budgets[i], i % 2 == 1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return got


def test_sixteen_concurrent_clients_get_the_one_at_a_time_greedy_answers(lms):
    lm, prompts = lms["gpt2"], _prompts(16, seed=1)
    budgets = [8 + i % 5 for i in range(16)]
    want = [_text(generate(lm, p, n, GREEDY, eod=EOD).tokens) for p, n in zip(prompts, budgets)]
    serving = _Serving(lm, max_batch_size=8)
    try:
        assert _concurrently(serving, "gpt2", prompts, budgets) == want
        assert serving.server.engine.steps["peak_batch"] >= 2  # they were batched
    finally:
        serving.close()


def _serve_split(path, layouts):
    """On 2 ranks, per (tp, pp): rank 0 serves a completion, a streamed chat and 6 concurrent
    completions to the openai client; the other rank follows the engine's steps."""
    answers = []
    for tp, pp in layouts:
        ps = ParallelState.build(tp, pp)
        lm = load_model(path, ps, dtype=torch.float32, device=CPU)
        if not is_serving_rank(ps):
            follow(lm, NullTokenizer(EOD), 4)
            continue
        serving = _Serving(lm, max_batch_size=4)
        try:
            c = serving.client()
            one = _complete(c, "llama", "5 17 42 8 3", 9, stream=False)
            chat = _stream_chat(c, "llama", max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
            many = _concurrently(serving, "llama", _prompts(6, seed=2), [7] * 6)
            answers.append((one, chat[0], many))
        finally:
            serving.close()
    return answers


@pytest.mark.slow
def test_server_at_tp2_pp2_and_tp2_x_pp2_answers_as_one_process(paths, lms):
    lm = lms["llama"]
    want = (
        _text(generate(lm, [5, 17, 42, 8, 3], 9, GREEDY, eod=EOD).tokens),
        _text(_expected_chat(lm, 12, SAMPLED, seed=7).tokens),
        [_text(generate(lm, p, 7, GREEDY, eod=EOD).tokens) for p in _prompts(6, seed=2)],
    )
    served, followed = run_distributed(_serve_split, 2, paths["llama"], [(2, 1), (1, 2)],
                                       timeout=180)  # fmt: skip
    assert followed == [] and served == [want, want]
    served, *followed = run_distributed(_serve_split, 4, paths["llama"], [(2, 2)], timeout=180)
    assert followed == [[], [], []] and served == [want]


@pytest.mark.slow
def test_cli_server_answers_the_openai_client_under_its_served_name(paths, lms):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools/generate.py"
    cmd = [sys.executable, str(tool), "--load", paths["llama"], "--server", "--port", "0",
           "--dtype", "fp32", "--served-model-name", "tiny-chat", "--chat-template", "plain",
           "--inference-max-requests", "3"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving POST http://127.0.0.1:PORT/generate, ..."
        assert "as 'tiny-chat'" in line and "3 requests at once" in line, proc.stderr.read()
        url = line.split()[2].rsplit("/", 1)[0] + "/v1"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        got = client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=12,
                                             temperature=0)  # fmt: skip
        assert got.choices[0].message.content == _text(_expected_chat(lms["llama"], 12).tokens)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the server stops cleanly
        assert proc.wait(timeout=30) == 0


def test_cli_refuses_no_requests_at_once_and_an_unknown_chat_template(paths, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "generate_tool", Path(__file__).resolve().parents[1] / "tools/generate.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--load", paths["gpt2"], "--server", "--inference-max-requests", "0"]) == 2
    assert "--inference-max-requests must be >= 1, got 0" in capsys.readouterr().err
    assert tool.main(["--load", paths["gpt2"], "--server", "--chat-template", "nosuch"]) == 2
    assert "--chat-template 'nosuch': expected default, chatml, plain" in capsys.readouterr().err
