"""OpenAI-compatible requests and answers: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

What is accepted (the fields of OpenAI's API, https://platform.openai.com/docs/api-reference):
`model` (the served name, or left out), `prompt` (one string, or one list of token ids) or
`messages` ([{role, content}], the chat template applied here: `ChatFormat` of data/chat.py),
`max_tokens` (chat: or `max_completion_tokens`), `temperature`, `top_p`, `stop` (a string or up to
4), `seed`, `stream`, `stream_options`, `n` = 1, `user`. Refused with a 400 that names the field:
`n` > 1, `best_of` > 1, `logprobs`/`top_logprobs`, `echo`, `suffix`, `logit_bias`, non-zero
`presence_penalty`/`frequency_penalty`, `tools`/`functions`, `response_format`, and any field
this list does not name.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from megatron_lite.data.chat import ChatFormat
from megatron_lite.errors import UserError
from megatron_lite.inference.generation import SamplingParams

COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "n", "stream", "stream_options"}
COMMON |= {"seed", "user"}
FIELDS = {
    "completion": COMMON | {"prompt"},
    "chat": COMMON | {"messages", "max_completion_tokens"},
}
# refused unless at the value that means "off" (clients may send the default explicitly)
REFUSED = {
    "n": 1,
    "best_of": 1,
    "logprobs": None,
    "top_logprobs": None,
    "echo": False,
    "suffix": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "response_format": None,
}
MAX_STOPS = 4


class OpenAIError(ValueError):
    """A refused request: its HTTP status and the field at fault (OpenAI's error object)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": None}}


@dataclass
class OpenAIRequest:
    kind: str  # "completion" or "chat"
    model: str
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int = 0
    stops: list[str] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _check_fields(req: dict, kind: str) -> None:
    for name, off in REFUSED.items():
        value = req.get(name)  # null, and false for an on/off field, mean "off" too
        if value is not None and value != off and not (off is None and value is False):
            allowed = "leave it out" if off is None else f"only {json.dumps(off)} is"
            raise OpenAIError(400, f"'{name}' = {json.dumps(value)} is not supported by this "
                              f"server ({allowed})", name)  # fmt: skip
    unknown = sorted(set(req) - FIELDS[kind] - set(REFUSED))
    if unknown:
        raise OpenAIError(400, f"unknown field(s) {unknown}; accepted: {sorted(FIELDS[kind])}")


def _number(req: dict, name: str, default: float) -> float:
    v = req.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise OpenAIError(400, f"'{name}' must be a number, got {v!r}", name)
    return v


def _stops(req: dict) -> list[str]:
    stop = req.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise OpenAIError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise OpenAIError(
            400, f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}", "stop"
        )
    return stops


def _prompt_ids(req: dict, kind: str, tokenizer, chat: ChatFormat | None) -> list[int]:
    if kind == "chat":
        try:
            return chat.encode(req.get("messages"), add_generation_prompt=True)[0]
        except UserError as e:
            raise OpenAIError(400, str(e), "messages") from None
        except Exception as e:  # a HF template's own checks (jinja2: "roles must alternate", ...)
            raise OpenAIError(
                400, f"the chat template refused the messages: {e}", "messages"
            ) from None
    prompt = req.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt  # token ids
    if not isinstance(prompt, str) or not prompt:
        raise OpenAIError(400, "'prompt' must be one non-empty string (or one list of token "
                          "ids); send several prompts as several requests", "prompt")  # fmt: skip
    try:
        return tokenizer.tokenize(prompt)
    except (ValueError, KeyError) as e:
        raise OpenAIError(400, f"prompt cannot be tokenized: {e}", "prompt") from None


def _max_tokens(req: dict, n_prompt: int, limits: dict) -> int:
    name = "max_completion_tokens" if req.get("max_completion_tokens") is not None else "max_tokens"
    room = limits["max_length"] - n_prompt
    v = req.get(name)
    if v is None:
        v = min(limits["default_new_tokens"], room)
    if type(v) is not int or not 1 <= v <= limits["max_new_tokens"]:
        raise OpenAIError(400, f"'{name}' must be an integer in [1, {limits['max_new_tokens']}], "
                          f"got {v!r}", name)  # fmt: skip
    if v > room:
        raise OpenAIError(400, f"the prompt ({n_prompt} tokens) + {name} ({v}) exceeds the "
                          f"model's {limits['max_length']} positions", name)  # fmt: skip
    return v


class _LongInt:
    """What a JSON integer of more digits than any field accepts parses to: a field check refuses
    it by name (int() of 5,000 digits raises past Python's digit limit, with no field named)."""

    def __init__(self, digits: str):
        self.digits = len(digits)

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def load_json_body(body: bytes):
    """The request body's JSON, or ValueError saying why not (bad UTF-8 or JSON, nested too deep)."""
    try:
        return json.loads(
            body.decode("utf-8"), parse_int=lambda s: int(s) if len(s) < 40 else _LongInt(s)
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError("request body is not valid JSON: nested too deep") from None


def parse_openai(
    body: bytes, kind: str, tokenizer, chat: ChatFormat, limits: dict
) -> OpenAIRequest:
    """The validated request, or an OpenAIError saying which field is wrong."""
    try:
        req = load_json_body(body)
    except ValueError as e:
        raise OpenAIError(400, str(e)) from None
    if not isinstance(req, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    _check_fields(req, kind)
    model = req.get("model") or limits["model"]
    if model != limits["model"]:
        raise OpenAIError(404, f"model {model!r} is not served here; this server serves "
                          f"{limits['model']!r}", "model")  # fmt: skip
    prompt = _prompt_ids(req, kind, tokenizer, chat)
    if len(prompt) > limits["max_prompt_tokens"]:
        raise OpenAIError(413, f"prompt is {len(prompt)} tokens, over the limit of "
                          f"{limits['max_prompt_tokens']}", "prompt")  # fmt: skip
    if any(not 0 <= t < limits["vocab_size"] for t in prompt):
        raise OpenAIError(400, f"prompt token ids must be in [0, {limits['vocab_size']})", "prompt")
    try:
        params = SamplingParams(
            temperature=_number(req, "temperature", 1.0), top_p=_number(req, "top_p", 1.0)
        )
    except ValueError as e:
        raise OpenAIError(400, str(e)) from None
    seed = req.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
        raise OpenAIError(400, f"'seed' must be a non-negative integer, got {seed!r}", "seed")
    if not isinstance(req.get("stream", False), bool):
        raise OpenAIError(400, "'stream' must be true or false", "stream")
    options = req.get("stream_options") or {}
    return OpenAIRequest(
        kind=kind,
        model=model,
        prompt=prompt,
        max_new_tokens=_max_tokens(req, len(prompt), limits),
        params=params,
        seed=seed or 0,
        stops=_stops(req),
        stop_ids=list(chat.stop_token_ids) if kind == "chat" else [],
        stream=bool(req.get("stream", False)),
        include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
    )


class TextStream:
    """The text of the new tokens, cut at the first stop string, released as it becomes final: an
    incomplete UTF-8 character (decoded as U+FFFD) or a possible start of a stop string waits."""

    def __init__(self, tokenizer, stops: list[str], hidden: set[int]):
        self.tokenizer, self.stops, self.hidden = tokenizer, stops, hidden
        self.sent = ""

    def text(self, tokens: list[int]) -> tuple[str, bool]:
        """(the text so far, cut before any stop string; whether a stop string was met)."""
        text = self.tokenizer.detokenize([t for t in tokens if t not in self.hidden])
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def stopped(self, tokens: list[int]) -> bool:
        """The engine's stop condition: a stop token id or a stop string."""
        return tokens[-1] in self.hidden or (bool(self.stops) and self.text(tokens)[1])

    def delta(self, tokens: list[int], final: bool = False) -> str:
        text, met = self.text(tokens)
        if not (final or met):
            text = text.rstrip("\ufffd")
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                       default=0)  # fmt: skip
            text = text[: len(text) - hold]
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        out, self.sent = text[len(self.sent) :], text
        return out


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


class Answer:
    """OpenAI's response objects for one request: the whole answer, or its stream's chunks."""

    def __init__(self, req: OpenAIRequest):
        self.req = req
        prefix = "chatcmpl" if req.kind == "chat" else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())

    def _object(self, chunk: bool) -> dict:
        name = "chat.completion" if self.req.kind == "chat" else "text_completion"
        name += ".chunk" if chunk and self.req.kind == "chat" else ""
        return {"id": self.id, "object": name, "created": self.created, "model": self.req.model}

    def _choice(self, text: str | None, reason: str | None, chunk: bool, first: bool) -> dict:
        choice = {"index": 0}
        if self.req.kind == "completion":
            choice.update(text=text or "", logprobs=None)
        elif chunk:
            choice["delta"] = {} if text is None else {"content": text}
            if first:
                choice["delta"]["role"] = "assistant"
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["finish_reason"] = reason
        return choice

    def full(self, text: str, reason: str, n_new: int) -> dict:
        obj = self._object(False)
        obj["choices"] = [self._choice(text, finish_reason(reason), False, False)]
        obj["usage"] = usage(len(self.req.prompt), n_new)
        return obj

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False) -> dict:
        obj = self._object(True)
        obj["choices"] = [self._choice(text, reason and finish_reason(reason), True, first)]
        return obj

    def usage_chunk(self, n_new: int) -> dict:
        obj = self._object(True)
        obj.update(choices=[], usage=usage(len(self.req.prompt), n_new))
        return obj


def models_list(name: str) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                        "owned_by": "megatron_lite"}]}  # fmt: skip
