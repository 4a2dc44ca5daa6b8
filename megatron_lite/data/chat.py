"""Chat templates: a conversation (`[{"role", "content"}, ...]`) -> token ids and a loss mask.

`ChatFormat.for_tokenizer(tok)` picks the template:
- `HuggingFaceTokenizer` with a `chat_template` (or `template=` a Jinja string): the tokenizer's own,
  through transformers' `apply_chat_template`. The assistant mask comes from the template's
  `{% generation %}` blocks where it has them, else from rendering prefixes of the conversation (the
  tokens an assistant turn adds to the conversation before it).
- otherwise a built-in template (`BUILTIN_TEMPLATES`), made of plain-text markers tokenized by the
  tokenizer itself, each turn ending with the tokenizer's end-of-document id:

  "chatml" (GPT2BPE, SentencePiece, a HuggingFace tokenizer without a template)::

      <|im_start|>system\\n{content}<EOD><|im_start|>user\\n{content}<EOD><|im_start|>assistant\\n...

  "plain" (NullTokenizer, whose text is ids: no role markers, turns alternate)::

      {content} <EOD> {content} <EOD> ...

  where <EOD> is the single end-of-document token (`tok.eod`), never the tokenization of its text:
  each segment is tokenized on its own, so `encode` is exact and `render` is for reading.

The mask is 1 on each assistant turn's tokens, its end token included (so the model learns to stop),
and 0 on everything else; `stop_token_ids` are the tokens that end an assistant turn (generation's
stop condition).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_lite.data.tokenizer import HuggingFaceTokenizer, NullTokenizer, Tokenizer
from megatron_lite.errors import DataError, TokenizerError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class BuiltinTemplate:
    """A template of plain-text markers: `prefix.format(role=...)` before each turn's content, then
    the end-of-document id; `generation_prompt` opens an assistant turn."""

    name: str
    prefix: str
    generation_prompt: str


BUILTIN_TEMPLATES = {
    "chatml": BuiltinTemplate("chatml", "<|im_start|>{role}\n", "<|im_start|>assistant\n"),
    "plain": BuiltinTemplate("plain", "", ""),
}


def template_choice(choice: str, flag: str = "--chat-template") -> str | None:
    """A --chat-template / --sft-tokenizer-prompt-format value as `ChatFormat.for_tokenizer` takes
    it: None for "default" (the tokenizer's own), a built-in name, or a Jinja file's text."""
    if choice == "default":
        return None
    if choice in BUILTIN_TEMPLATES:
        return choice
    if not os.path.isfile(choice):
        raise DataError(
            f"{flag} {choice!r}: expected default, {', '.join(BUILTIN_TEMPLATES)} "
            "or a Jinja template file"
        )
    with open(choice, encoding="utf-8") as f:
        return f.read()


def check_messages(messages: object, where: str = "messages") -> list[dict]:
    """`messages` as a list of {role, content} with known roles and string contents, else a
    DataError naming `where` (a file and line, say) and what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} 'content' must be a string")
    return messages


class ChatFormat:
    """The common interface; `for_tokenizer` returns the right subclass."""

    tokenizer: Tokenizer
    stop_token_ids: list[int]
    name: str

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, template: str | None = None) -> ChatFormat:
        """The tokenizer's own template (HuggingFace), else a built-in one. `template`: a built-in
        name ("chatml", "plain"), or for a HuggingFace tokenizer a Jinja chat template string."""
        if template in BUILTIN_TEMPLATES:
            return BuiltinChatFormat(tokenizer, BUILTIN_TEMPLATES[template])
        if isinstance(tokenizer, HuggingFaceTokenizer):
            jinja = template or getattr(tokenizer.hf, "chat_template", None)
            if jinja:
                return HFChatFormat(tokenizer, jinja)
        elif template is not None:
            raise TokenizerError(
                f"chat template {template!r}: expected one of {', '.join(BUILTIN_TEMPLATES)} "
                f"(Jinja templates need --tokenizer-type HuggingFaceTokenizer)"
            )
        default = "plain" if isinstance(tokenizer, NullTokenizer) else "chatml"
        return BuiltinChatFormat(tokenizer, BUILTIN_TEMPLATES[default])

    def encode(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of the conversation, and a 0/1 mask with 1 on assistant tokens."""
        raise NotImplementedError

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text (for reading, logs and the server's prompt echo)."""
        raise NotImplementedError

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The ids of a prompt for generation: the conversation and an opened assistant turn
        (what the server feeds the model; no mask is computed)."""
        return self.encode(messages, add_generation_prompt=True)[0]

    def encode_prompt_response(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """A `prompt`/`response` pair as one user turn and one assistant turn."""
        return self.encode(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        )


def _text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text`'s ids without the tokenizer's own special tokens (a HuggingFace tokenizer's BOS):
    the template decides where those go."""
    if not text:
        return []
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return list(tokenizer.hf.encode(text, add_special_tokens=False))
    return list(tokenizer.tokenize(text))


class BuiltinChatFormat(ChatFormat):
    """A `BuiltinTemplate` over any tokenizer: each marker and content tokenized on its own."""

    def __init__(self, tokenizer: Tokenizer, template: BuiltinTemplate) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.name = template.name
        self.stop_token_ids = [int(tokenizer.eod)]

    def _segments(self, messages: list[dict], add_generation_prompt: bool):
        """(text or None for the end token, is-assistant) in order."""
        for m in check_messages(messages):
            yield self.template.prefix.format(role=m["role"]), False
            is_assistant = m["role"] == "assistant"
            yield m["content"], is_assistant
            yield None, is_assistant
        if add_generation_prompt:
            yield self.template.generation_prompt, False

    def encode(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        for text, is_assistant in self._segments(messages, add_generation_prompt):
            seg = [int(self.tokenizer.eod)] if text is None else _text_ids(self.tokenizer, text)
            ids += seg
            mask += [int(is_assistant)] * len(seg)
        return ids, mask

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        eod_text = self.tokenizer.detokenize([self.tokenizer.eod])
        parts = [
            eod_text if text is None else text
            for text, _ in self._segments(messages, add_generation_prompt)
        ]
        sep = " " if isinstance(self.tokenizer, NullTokenizer) else ""
        return sep.join(p for p in parts if p)


def mask_spans(n: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """A 0/1 list of length n with 1 on each [start, end) span."""
    mask = [0] * n
    for start, end in spans:
        mask[start:end] = [1] * (end - start)
    return mask


# ---------------------------------------------------------------------------------------------------
# A HuggingFace tokenizer's own chat template (Jinja), through transformers' `apply_chat_template`.
#
# The assistant mask: where the template marks assistant text with `{% generation %}` blocks,
# transformers returns it (`return_assistant_tokens_mask`); elsewhere it is computed by rendering
# prefixes: an assistant turn i covers the tokens between `messages[:i]` with the generation prompt
# and `messages[:i + 1]`, cut after its last stop token (a ChatML template's newline after
# `<|im_end|>` is not the model's to predict). That needs a template whose rendering of a prefix is a
# prefix of the whole (true of ChatML, Llama 3, Mistral); one that rewrites earlier turns (dropping
# past reasoning, say) is refused with a clear error rather than given a wrong mask.

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


class HFChatFormat(ChatFormat):
    """`tokenizer.hf`'s chat template (or `jinja`, a template string, in its place)."""

    def __init__(self, tokenizer: HuggingFaceTokenizer, jinja: str) -> None:
        self.tokenizer = tokenizer
        self.hf = tokenizer.hf
        self.jinja = jinja
        self.name = "huggingface"
        self.has_generation_blocks = bool(_GENERATION_BLOCK.search(jinja))
        self.stop_token_ids = self._find_stop_tokens()

    def _apply(self, messages: list[dict], add_generation_prompt: bool, mask: bool = False):
        """apply_chat_template's dict: input_ids (and assistant_masks where `mask`)."""
        return self.hf.apply_chat_template(
            messages,
            chat_template=self.jinja,
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            return_dict=True,
            return_assistant_tokens_mask=mask,
        )

    def _ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        return [int(t) for t in self._apply(messages, add_generation_prompt)["input_ids"]]

    def _find_stop_tokens(self) -> list[int]:
        """eos, and the special tokens the template puts after an assistant's content (ChatML's
        `<|im_end|>`, Llama 3's `<|eot_id|>`): generation stops on any of them."""
        stops = [int(self.hf.eos_token_id)]
        try:
            start = len(self._ids(_PROBE[:1], add_generation_prompt=True))
            turn = self._ids(_PROBE, add_generation_prompt=False)[start:]
        except Exception:  # a template that needs more than a user turn: eos alone
            return stops
        special = set(int(i) for i in self.hf.all_special_ids)
        content = set(self.hf.encode(_PROBE[1]["content"], add_special_tokens=False))
        for t in turn:
            if t in special and t not in content and t not in stops:
                stops.append(t)
        return stops

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.hf.apply_chat_template(
            check_messages(messages),
            chat_template=self.jinja,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self._ids(check_messages(messages), add_generation_prompt=True)

    def encode(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        check_messages(messages)
        if self.has_generation_blocks:
            out = self._apply(messages, add_generation_prompt, mask=True)
            return [int(t) for t in out["input_ids"]], [int(m) for m in out["assistant_masks"]]
        ids = self._ids(messages, add_generation_prompt)
        spans = [
            self._turn_span(messages, i, ids)
            for i, m in enumerate(messages)
            if m["role"] == "assistant"
        ]
        return ids, mask_spans(len(ids), spans)

    def _first_turn_start(self, ids: list[int]) -> int:
        """Where the content of a conversation's opening assistant turn starts: after the first
        occurrence of the generation prompt's tokens (a conversation cannot be rendered empty)."""
        user = self._ids(_PROBE[:1], add_generation_prompt=False)
        opened = self._ids(_PROBE[:1], add_generation_prompt=True)
        header = opened[len(user) :] if opened[: len(user)] == user else []
        for j in range(len(ids) - len(header) + 1):
            if ids[j : j + len(header)] == header:
                return j + len(header)
        return 0

    def _turn_span(self, messages: list[dict], i: int, ids: list[int]) -> tuple[int, int]:
        """[start, end) of assistant turn i in `ids`, the whole conversation's tokens."""
        if i == 0:  # an assistant turn first: after the template's assistant header
            before = ids[: self._first_turn_start(ids)]
        else:
            before = self._ids(messages[:i], add_generation_prompt=True)
        through = self._ids(messages[: i + 1], add_generation_prompt=False)
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise TokenizerError(
                "chat template: rendering the start of a conversation does not give the start of "
                "the whole (the template rewrites earlier turns), so the assistant mask cannot be "
                "computed by prefixes; use a template with {% generation %} blocks"
            )
        start, end = len(before), len(through)
        last_stop = max(
            (j for j in range(start, end) if ids[j] in self.stop_token_ids), default=end - 1
        )
        return start, last_stop + 1
