"""A HuggingFace tokenizer's own chat template (Jinja), through transformers' `apply_chat_template`.

The assistant mask: where the template marks assistant text with `{% generation %}` blocks,
transformers returns it (`return_assistant_tokens_mask`); elsewhere it is computed by rendering
prefixes: an assistant turn i covers the tokens between `messages[:i]` with the generation prompt
and `messages[:i + 1]`, cut after its last stop token (a ChatML template's newline after
`<|im_end|>` is not the model's to predict). That needs a template whose rendering of a prefix is a
prefix of the whole (true of ChatML, Llama 3, Mistral); one that rewrites earlier turns (dropping
past reasoning, say) is refused with a clear error rather than given a wrong mask.
"""

from __future__ import annotations

import re

from megatron_lite.data.chat import ChatFormat, check_messages, mask_spans
from megatron_lite.data.tokenizer import HuggingFaceTokenizer
from megatron_lite.errors import TokenizerError

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
