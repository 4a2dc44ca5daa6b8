"""The one request validator of every HTTP route (`/generate`, `/v1/completions`,
`/v1/chat/completions`) and of the Python API's prompts, and the one error type they raise.

    req = parse_request(body, "chat", tokenizer, chat_format, limits)   # or RequestError
    check_prompt(prompt_ids, max_new_tokens, max_length, vocab_size)    # generate, Engine.submit

A route differs only in its fields (`ROUTES`): which it accepts, how its prompt is given (our
`/generate`: a string; OpenAI's: a string, token ids or chat messages), the name of its token
budget, and how its messages name a field (OpenAI's quote it, ours not). Every check after that is
shared: prompt limits, the budget, sampling parameters, the seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from megatron_lite.errors import UserError
from megatron_lite.inference.sampling import SamplingParams

MAX_STOPS = 4
MAX_SEED = 2**63 - 1
_OPENAI = {"model", "max_tokens", "temperature", "top_p", "stop", "n", "stream", "stream_options"}
_OPENAI |= {"seed", "user"}
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


@dataclass(frozen=True)
class Route:
    fields: frozenset[str]
    openai: bool  # OpenAI's fields: refused ones, `model`, `stop`, `stream`; names quoted

    def label(self, name: str) -> str:
        return f"'{name}'" if self.openai else name


ROUTES = {
    "generate": Route(
        frozenset({"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}),
        openai=False,
    ),  # fmt: skip
    "completion": Route(frozenset(_OPENAI | {"prompt"}), openai=True),
    "chat": Route(frozenset(_OPENAI | {"messages", "max_completion_tokens"}), openai=True),
}


class RequestError(ValueError):
    """A refused request: its HTTP status and the field at fault (`body()`: OpenAI's error
    object; our `/generate` answers {"error": message})."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": None}}


@dataclass
class GenerationRequest:
    kind: str  # a ROUTES key
    model: str
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int = 0
    text: str | None = None  # the prompt as sent, when it was a string
    stops: list[str] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def check_prompt(
    prompt: list[int],
    max_new_tokens: int,
    max_length: int,
    vocab_size: int,
    name: str = "max_new_tokens",
) -> None:
    """A prompt the model can extend by `max_new_tokens` (`name`: that budget's field)."""
    if not prompt:
        raise RequestError(400, "the prompt is empty: give at least one token", "prompt")
    if len(prompt) + max_new_tokens > max_length:
        raise RequestError(400, f"the prompt ({len(prompt)} tokens) + {name} ({max_new_tokens}) "
                           f"exceeds the model's {max_length} positions", name)  # fmt: skip
    if any(not 0 <= t < vocab_size for t in prompt):
        raise RequestError(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")


class _LongInt:
    """What a JSON integer of more digits than any field accepts parses to: a field check refuses
    it by name (int() of 5,000 digits raises past Python's digit limit, with no field named)."""

    def __init__(self, digits: str):
        self.digits = len(digits)

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def load_json_body(body: bytes) -> dict:
    """The request body's JSON object, or a 400 saying why not (bad UTF-8 or JSON, nested too
    deep, not an object)."""
    try:
        req = json.loads(
            body.decode("utf-8"), parse_int=lambda s: int(s) if len(s) < 40 else _LongInt(s)
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "request body is not valid JSON: nested too deep") from None
    if not isinstance(req, dict):
        raise RequestError(400, "request body must be a JSON object")
    return req


def _check_fields(req: dict, route: Route) -> None:
    refused = REFUSED if route.openai else {}
    for name, off in refused.items():
        value = req.get(name)  # null, and false for an on/off field, mean "off" too
        if value is not None and value != off and not (off is None and value is False):
            allowed = "leave it out" if off is None else f"only {json.dumps(off)} is"
            raise RequestError(400, f"'{name}' = {json.dumps(value)} is not supported by this "
                               f"server ({allowed})", name)  # fmt: skip
    unknown = sorted(set(req) - route.fields - set(refused))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; accepted: {sorted(route.fields)}")


def _int(req: dict, name: str, default: int, lo: int, hi: int, route: Route) -> int:
    v = req.get(name)
    v = default if v is None else v
    if type(v) is not int or not lo <= v <= hi:
        raise RequestError(400, f"{route.label(name)} must be an integer in [{lo}, {hi}], "
                           f"got {v!r}", name)  # fmt: skip
    return v


def _number(req: dict, name: str, default: float, route: Route) -> float:
    v = req.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(400, f"{route.label(name)} must be a number, got {v!r}", name)
    return v


def _prompt_text(req: dict, route: Route, limits: dict) -> str | list[int]:
    prompt = req.get("prompt")
    if route.openai and isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return prompt  # token ids
    if not isinstance(prompt, str) or not prompt:
        if not route.openai:
            raise RequestError(400, "'prompt' is required and must be a non-empty string", "prompt")
        raise RequestError(400, "'prompt' must be one non-empty string (or one list of token "
                           "ids); send several prompts as several requests", "prompt")  # fmt: skip
    if len(prompt) > limits["max_prompt_chars"]:
        raise RequestError(413, f"prompt has {len(prompt)} characters, over the limit of "
                           f"{limits['max_prompt_chars']}", "prompt")  # fmt: skip
    return prompt


def _prompt(req: dict, kind: str, tokenizer, chat, limits: dict) -> tuple[list[int], str | None]:
    """(the prompt's token ids, its text when it came as a string)."""
    if kind == "chat":
        try:
            return chat.encode(req.get("messages"), add_generation_prompt=True)[0], None
        except UserError as e:
            raise RequestError(400, str(e), "messages") from None
        except Exception as e:  # a HF template's own checks (jinja2: "roles must alternate", ...)
            raise RequestError(
                400, f"the chat template refused the messages: {e}", "messages"
            ) from None
    prompt = _prompt_text(req, ROUTES[kind], limits)
    if isinstance(prompt, list):
        return prompt, None
    try:
        return tokenizer.tokenize(prompt), prompt
    except (ValueError, KeyError) as e:
        raise RequestError(400, f"prompt cannot be tokenized: {e}", "prompt") from None


def _max_new_tokens(req: dict, route: Route, n_prompt: int, limits: dict) -> tuple[str, int]:
    """(the budget's field name, its value: by default what fits, up to the server's default)."""
    name = "max_tokens" if route.openai else "max_new_tokens"
    if route.openai and req.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    default = min(limits["default_new_tokens"], limits["max_length"] - n_prompt)
    return name, _int(req, name, default, 1, limits["max_new_tokens"], route)


def parse_request(body: bytes, kind: str, tokenizer, chat, limits: dict) -> GenerationRequest:
    """The validated request of route `kind` (a ROUTES key), or a RequestError saying which field
    is wrong. `limits`: max_length, max_prompt_tokens, max_prompt_chars, max_new_tokens,
    default_new_tokens, vocab_size and the served model's name."""
    route = ROUTES[kind]
    req = load_json_body(body)
    _check_fields(req, route)
    model = req.get("model") or limits["model"]
    if model != limits["model"]:
        raise RequestError(404, f"model {model!r} is not served here; this server serves "
                           f"{limits['model']!r}", "model")  # fmt: skip
    prompt, text = _prompt(req, kind, tokenizer, chat, limits)
    if len(prompt) > limits["max_prompt_tokens"]:
        raise RequestError(413, f"prompt is {len(prompt)} tokens, over the limit of "
                           f"{limits['max_prompt_tokens']}", "prompt")  # fmt: skip
    name, max_new = _max_new_tokens(req, route, len(prompt), limits)
    check_prompt(prompt, max_new, limits["max_length"], limits["vocab_size"], name)
    try:
        params = SamplingParams(
            temperature=_number(req, "temperature", 1.0, route),
            top_k=0 if req.get("top_k") is None else req["top_k"],
            top_p=_number(req, "top_p", 1.0, route),
        )
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    seed = _int(req, "seed", 0, 0, MAX_SEED, route)
    if not isinstance(req.get("stream", False), bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    options = req.get("stream_options") or {}
    return GenerationRequest(
        kind=kind,
        model=model,
        prompt=prompt,
        max_new_tokens=max_new,
        params=params,
        seed=seed,
        text=text,
        stops=_stops(req),
        stop_ids=list(chat.stop_token_ids) if kind == "chat" else [],
        stream=bool(req.get("stream", False)),
        include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
    )


def _stops(req: dict) -> list[str]:
    stop = req.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(
            400, f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}", "stop"
        )
    return stops
