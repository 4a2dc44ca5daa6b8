"""A small HTTP JSON endpoint for `generate` (stdlib http.server), bound to 127.0.0.1 by default.

    POST /generate  {"prompt": "Hello", "max_new_tokens": 32, "temperature": 0.8, "top_k": 0,
                     "top_p": 0.9, "seed": 0}
    -> 200 {"prompt": ..., "completion": ..., "tokens": [...], "finish_reason": "eod" | "length"}
    GET /health -> 200 {"status": "ok"}

Bad requests get a 4xx with {"error": "<what was wrong>"}: 400 malformed JSON, a missing or empty
prompt, unknown fields, bad parameter values; 411 no Content-Length; 413 a body over
`max_request_bytes` or a prompt over `max_prompt_tokens`; 404/405 other paths and methods.
Each connection gets its own thread (reading a request, with a per-connection socket timeout, so a
client stalled mid-body holds only its own thread) and up to `LISTEN_BACKLOG` connections wait to be
accepted; generation itself runs one request at a time (it holds the model). Split over several
ranks (tp x pp),
the model's first rank serves HTTP and broadcasts each request to the others, which run `follow` in
a loop.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from megatron_lite import comm, device
from megatron_lite.inference.generation import LanguageModel, SamplingParams, generate

FIELDS = {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}
LISTEN_BACKLOG = 128  # socketserver's default of 5 resets connections under a burst of clients


class _Server(ThreadingHTTPServer):
    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True  # a stalled client's thread never holds up shutdown


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _int_field(req: dict, name: str, default: int, lo: int, hi: int) -> int:
    v = req.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise RequestError(400, f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def parse_request(body: bytes, tokenizer, limits: dict) -> dict:
    """The validated request (prompt tokens, sampling) or a RequestError with its status."""
    try:
        req = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise RequestError(400, "request body must be a JSON object")
    unknown = sorted(set(req) - FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; accepted: {sorted(FIELDS)}")
    prompt = req.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "'prompt' is required and must be a non-empty string")
    if len(prompt) > limits["max_prompt_chars"]:
        raise RequestError(
            413,
            f"prompt has {len(prompt)} characters, over the limit of {limits['max_prompt_chars']}",
        )
    try:
        tokens = tokenizer.tokenize(prompt)
    except (ValueError, KeyError) as e:
        raise RequestError(400, f"prompt cannot be tokenized: {e}") from None
    if len(tokens) > limits["max_prompt_tokens"]:
        raise RequestError(
            413, f"prompt is {len(tokens)} tokens, over the limit of {limits['max_prompt_tokens']}"
        )
    max_new = _int_field(
        req, "max_new_tokens", limits["default_new_tokens"], 1, limits["max_new_tokens"]
    )
    if len(tokens) + max_new > limits["max_length"]:
        raise RequestError(
            400,
            f"prompt ({len(tokens)} tokens) + max_new_tokens ({max_new}) "
            f"exceeds the model's {limits['max_length']} positions",
        )
    if any(not 0 <= t < limits["vocab_size"] for t in tokens):
        raise RequestError(400, f"prompt token ids must be in [0, {limits['vocab_size']})")
    try:
        params = SamplingParams(
            temperature=req.get("temperature", 1.0),
            top_k=req.get("top_k", 0),
            top_p=req.get("top_p", 1.0),
        )
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    seed = _int_field(req, "seed", 0, 0, 2**63 - 1)
    return {
        "prompt": prompt,
        "tokens": tokens,
        "max_new_tokens": max_new,
        "seed": seed,
        "sampling": [params.temperature, params.top_k, params.top_p],
    }


def run_request(lm: LanguageModel, tokenizer, req: dict) -> dict:
    out = generate(
        lm,
        req["tokens"],
        req["max_new_tokens"],
        SamplingParams(*req["sampling"]),
        eod=getattr(tokenizer, "eod", None),
        seed=req["seed"],
    )
    text_ids = out.tokens[:-1] if out.finish_reason == "eod" else out.tokens
    return {
        "prompt": req["prompt"],
        "completion": tokenizer.detokenize(text_ids),
        "tokens": out.tokens,
        "finish_reason": out.finish_reason,
    }


def is_serving_rank(ps) -> bool:
    """The rank that serves HTTP: the model's first rank (first stage, tp rank 0)."""
    return ps.rank == ps.mp_ranks[0]


def _broadcast_request(req: dict | None, lm: LanguageModel) -> dict | None:
    """The serving rank's request (None = stop) on every rank of the model, as JSON bytes (no
    pickling)."""
    ps = lm.ps
    if ps.tp_size * ps.pp_size == 1:
        return req
    src, serving = ps.mp_ranks[0], is_serving_rank(ps)
    dev = device.comm_device(ps.backend)  # NCCL broadcasts only GPU tensors
    data = json.dumps(req).encode() if serving else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    comm.broadcast(size, src, ps.mp_group)
    buf = torch.zeros(int(size), dtype=torch.uint8, device=dev)
    if serving:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    comm.broadcast(buf, src, ps.mp_group)
    return json.loads(buf.cpu().numpy().tobytes().decode())


def follow(lm: LanguageModel, tokenizer) -> None:
    """Loop of the other ranks: run each request the serving rank broadcasts, until a stop."""
    while (req := _broadcast_request(None, lm)) is not None:
        run_request(lm, tokenizer, req)


class GenerationServer:
    """`serve_forever()` on (host, port); `shutdown()` from another thread stops it (and, under tp,
    the following ranks)."""

    def __init__(
        self,
        lm: LanguageModel,
        tokenizer,
        host: str = "127.0.0.1",
        port: int = 5000,
        *,
        max_request_bytes: int = 64 * 1024,
        max_prompt_tokens: int | None = None,
        max_new_tokens: int = 256,
        default_new_tokens: int = 32,
        socket_timeout: float = 10.0,
    ):
        self.lm, self.tokenizer = lm, tokenizer
        self.max_request_bytes = max_request_bytes
        self.limits = {
            "max_length": lm.max_length,
            "max_prompt_tokens": min(max_prompt_tokens or lm.max_length - 1, lm.max_length - 1),
            "max_prompt_chars": max_request_bytes,
            "max_new_tokens": max_new_tokens,
            "default_new_tokens": min(default_new_tokens, max_new_tokens),
            "vocab_size": lm.vocab_size,
        }
        self._lock = threading.Lock()
        self.httpd = _Server((host, port), self._handler_class(socket_timeout))
        self.address = self.httpd.server_address[:2]

    def _handler_class(self, socket_timeout: float):
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = socket_timeout  # a client that never sends its body cannot hold the server

            def log_message(self, format, *args):  # noqa: A002 - quiet: one line per request
                pass

            def _reply(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    return self._reply(200, {"status": "ok"})
                if self.path == "/generate":
                    return self._reply(405, {"error": "use POST /generate with a JSON body"})
                return self._reply(404, {"error": f"no such path {self.path}; POST /generate"})

            def do_POST(self):
                if self.path != "/generate":
                    return self._reply(404, {"error": f"no such path {self.path}; POST /generate"})
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    return self._reply(411, {"error": "a Content-Length header is required"})
                if int(length) > server.max_request_bytes:
                    self.close_connection = True
                    return self._reply(
                        413,
                        {
                            "error": f"request body of {length} bytes is over "
                            f"the limit of {server.max_request_bytes}"
                        },
                    )
                try:
                    body = self.rfile.read(int(length))
                except TimeoutError:  # stalled mid-body: only this connection's thread waited
                    self.close_connection = True
                    return self._reply(
                        408, {"error": f"request body not received within {socket_timeout:g} s"}
                    )
                if len(body) < int(length):  # the client went away mid-body
                    self.close_connection = True
                    return None
                try:
                    req = parse_request(body, server.tokenizer, server.limits)
                except RequestError as e:
                    return self._reply(e.status, {"error": str(e)})
                with server._lock:
                    _broadcast_request(req, server.lm)
                    result = run_request(server.lm, server.tokenizer, req)
                self._reply(200, result)

        return Handler

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever(poll_interval=0.1)
        finally:
            self.httpd.server_close()
            with self._lock:
                _broadcast_request(None, self.lm)  # the following ranks stop too

    def shutdown(self) -> None:
        self.httpd.shutdown()
