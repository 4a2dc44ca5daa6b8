"""OpenAI-compatible answers of `/v1/completions`, `/v1/chat/completions` and `/v1/models`.

What is accepted (the fields of OpenAI's API, https://platform.openai.com/docs/api-reference):
`model` (the served name, or left out), `prompt` (one string, or one list of token ids) or
`messages` ([{role, content}], the chat template applied here: `ChatFormat` of data/chat.py),
`max_tokens` (chat: or `max_completion_tokens`), `temperature`, `top_p`, `stop` (a string or up to
4), `seed`, `stream`, `stream_options`, `n` = 1, `user`. Refused with a 400 that names the field:
`n` > 1, `best_of` > 1, `logprobs`/`top_logprobs`, `echo`, `suffix`, `logit_bias`, non-zero
`presence_penalty`/`frequency_penalty`, `tools`/`functions`, `response_format`, and any field
this list does not name (`validation.py` checks every route's requests).
"""

from __future__ import annotations

import time
import uuid

from megatron_lite.inference.validation import GenerationRequest


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

    def __init__(self, req: GenerationRequest):
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
