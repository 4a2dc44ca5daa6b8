"""The generation server (stdlib http.server), bound to 127.0.0.1 by default: our JSON endpoint
and OpenAI-compatible ones (openai_api.py), all fed to one continuous-batching `Engine`.

    POST /generate  {"prompt": "Hello", "max_new_tokens": 32, "temperature": 0.8, "top_k": 0,
                     "top_p": 0.9, "seed": 0}
    -> 200 {"prompt": ..., "completion": ..., "tokens": [...], "finish_reason": "eod" | "length"}
    POST /v1/completions, POST /v1/chat/completions (`"stream": true`: server-sent events)
    GET /v1/models, GET /health -> 200 {"status": "ok"}

Bad requests get a 4xx with {"error": "<what was wrong>"} (OpenAI paths: OpenAI's error object):
400 malformed JSON, a missing or empty prompt, unknown fields, bad parameter values; 411 no
Content-Length; 413 a body over `max_request_bytes` or a prompt over `max_prompt_tokens`; 404/405
other paths and methods. Each connection gets its own thread (reading a request, with a
per-connection socket timeout, so a client stalled mid-body holds only its own thread) and up to
`LISTEN_BACKLOG` connections wait to be accepted; the threads hand their requests to the engine,
which batches them (up to `max_batch_size` at once). Split over several ranks (tp x pp), the
model's first rank serves HTTP and runs the engine, which broadcasts each step to the others; they
run `follow` in a loop.
"""

from __future__ import annotations

import json
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from megatron_lite.data.chat import ChatFormat
from megatron_lite.inference import engine as engine_mod
from megatron_lite.inference.engine import DEFAULT_MAX_REQUESTS, Engine, Request
from megatron_lite.inference.generation import LanguageModel
from megatron_lite.inference.openai_api import Answer, TextStream, models_list
from megatron_lite.inference.validation import GenerationRequest, RequestError, parse_request

LISTEN_BACKLOG = 128  # socketserver's default of 5 resets connections under a burst of clients


class _Server(ThreadingHTTPServer):
    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True  # a stalled client's thread never holds up shutdown


def run_request(engine: Engine, tokenizer, req: GenerationRequest) -> dict:
    """POST /generate's answer: the request through the engine."""
    eod = getattr(tokenizer, "eod", None)
    out = engine.submit(Request(req.prompt, req.max_new_tokens, req.params, req.seed, eod))
    out = out.result()
    text_ids = out.tokens[:-1] if out.finish_reason == "eod" else out.tokens
    return {
        "prompt": req.text,
        "completion": tokenizer.detokenize(text_ids),
        "tokens": out.tokens,
        "finish_reason": out.finish_reason,
    }


def is_serving_rank(ps) -> bool:
    """The rank that serves HTTP: the model's first rank (first stage, tp rank 0)."""
    return ps.rank == ps.mp_ranks[0]


def follow(lm: LanguageModel, tokenizer=None, max_batch_size: int = DEFAULT_MAX_REQUESTS) -> None:
    """Loop of the other ranks: run each engine step the serving rank broadcasts, until a stop.
    `max_batch_size` must be the serving rank's; `tokenizer` is unused (the serving rank
    tokenizes), kept so that callers of the one-request-at-a-time server still work."""
    engine_mod.follow(lm, max_batch_size)


POST_PATHS = {
    "/generate": "generate",
    "/v1/completions": "completion",
    "/v1/chat/completions": "chat",
}


class GenerationServer:
    """`serve_forever()` on (host, port); `shutdown()` from another thread stops it (and, under tp,
    the following ranks). `model_name`: the id /v1/models lists (default: the checkpoint's
    directory name); `chat_template`: a built-in name or Jinja string (default: the tokenizer's)."""

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
        max_batch_size: int = DEFAULT_MAX_REQUESTS,
        model_name: str | None = None,
        chat_template: str | None = None,
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
            "model": model_name or os.path.basename(os.path.normpath(lm.path)),
        }
        self.chat = ChatFormat.for_tokenizer(tokenizer, chat_template)
        self.engine = Engine(lm, max_batch_size)
        self.httpd = _Server((host, port), _handler_class(self, socket_timeout))
        self.address = self.httpd.server_address[:2]

    def serve_forever(self) -> None:
        self.engine.start()
        try:
            self.httpd.serve_forever(poll_interval=0.1)
        finally:
            self.httpd.server_close()
            self.engine.stop()  # the following ranks stop too

    def shutdown(self) -> None:
        self.httpd.shutdown()

    def openai_stream(self, req, handle: Request, text: TextStream):
        """The chunks of a streamed answer, as the engine samples its tokens."""
        answer, tokens = Answer(req), []
        if req.kind == "chat":
            yield answer.chunk("", first=True)
        for token in handle.stream():
            tokens.append(token)
            if delta := text.delta(tokens):
                yield answer.chunk(delta)
        if delta := text.delta(tokens, final=True):
            yield answer.chunk(delta)
        yield answer.chunk(None, handle.finish_reason)
        if req.include_usage:
            yield answer.usage_chunk(len(tokens))

    def openai_submit(self, req) -> tuple[Request, TextStream]:
        eod = getattr(self.tokenizer, "eod", None)
        hidden = {t for t in (eod, *req.stop_ids) if t is not None}
        text = TextStream(self.tokenizer, req.stops, hidden)
        handle = Request(req.prompt, req.max_new_tokens, req.params, req.seed, eod, text.stopped)
        return self.engine.submit(handle), text


def _handler_class(server: GenerationServer, socket_timeout: float):
    class Handler(BaseHTTPRequestHandler):
        timeout = socket_timeout  # a client that never sends its body cannot hold the server

        def setup(self):
            super().setup()
            # a stream's small chunks leave as they are written, not held back by Nagle's
            # algorithm for the client's ACK of the previous one
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format, *args):  # noqa: A002 - quiet: one line per request
            pass

        def _reply(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, param: str | None = None) -> None:
            """Our {"error": message} on /generate, OpenAI's error object on /v1/..."""
            if self.path.startswith("/v1/"):
                return self._reply(status, RequestError(status, message, param).body())
            return self._reply(status, {"error": message})

        def do_GET(self):
            if self.path == "/health":
                return self._reply(200, {"status": "ok"})
            if self.path == "/v1/models":
                return self._reply(200, models_list(server.limits["model"]))
            if self.path in POST_PATHS:
                return self._error(405, f"use POST {self.path} with a JSON body")
            return self._error(404, f"no such path {self.path}; POST {', '.join(POST_PATHS)}")

        def do_POST(self):
            if self.path not in POST_PATHS:
                return self._error(404, f"no such path {self.path}; POST {', '.join(POST_PATHS)}")
            body = self._body()
            if body is None:
                return None
            try:
                req = parse_request(body, POST_PATHS[self.path], server.tokenizer, server.chat,
                                    server.limits)  # fmt: skip
            except RequestError as e:
                return self._error(e.status, str(e), e.param)
            if req.kind != "generate":
                return self._openai(req)
            try:
                return self._reply(200, run_request(server.engine, server.tokenizer, req))
            except RuntimeError as e:  # the engine stopped or failed
                return self._error(500, str(e))

        def _body(self) -> bytes | None:
            """The request body, or None after replying why there is none."""
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._error(411, "a Content-Length header is required")
            if int(length) > server.max_request_bytes:
                self.close_connection = True
                return self._error(413, f"request body of {length} bytes is over "
                                   f"the limit of {server.max_request_bytes}")  # fmt: skip
            try:
                body = self.rfile.read(int(length))
            except TimeoutError:  # stalled mid-body: only this connection's thread waited
                self.close_connection = True
                return self._error(408, f"request body not received within {socket_timeout:g} s")
            if len(body) < int(length):  # the client went away mid-body
                self.close_connection = True
                return None
            return body

        def _openai(self, req: GenerationRequest):
            try:
                handle, text = server.openai_submit(req)
            except RuntimeError as e:  # the engine is stopping
                return self._error(503, str(e))
            if req.stream:
                return self._stream(server.openai_stream(req, handle, text), handle)
            try:
                out = handle.result()
            except RuntimeError as e:
                return self._error(500, str(e))
            self._reply(200, Answer(req).full(text.text(out.tokens)[0], out.finish_reason,
                                              len(out.tokens)))  # fmt: skip

        def _stream(self, chunks, handle: Request) -> None:
            """Server-sent events: one `data: {chunk}` per event, then `data: [DONE]`; the
            connection closes after it (HTTP/1.0: no length needed)."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.close_connection = True
            try:
                try:
                    for chunk in chunks:
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                except RuntimeError as e:  # the engine failed mid-answer
                    body = RequestError(500, str(e)).body()
                    self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except OSError:  # the client went away: free its row
                handle.cancel()

    return Handler
