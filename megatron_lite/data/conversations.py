"""JSONL records of fine-tuning data -> token ids and loss masks, through a `ChatFormat`.

SFT, one of:
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}             (one user turn, one assistant turn)
DPO (a preference pair), one of:
    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"prompt": [messages], "chosen": "...", "rejected": "..."}        (a multi-turn prompt)
    {"chosen": [messages], "rejected": [messages]}   (full conversations; the last turn differs)
For DPO only the final assistant turn (the response) is in the mask: the log-probability of the
response given the prompt is what the DPO loss compares.

Every problem raises `BadLineError` with the file and line.
"""

from __future__ import annotations

import numpy as np

from megatron_lite.data.chat import ChatFormat, check_messages
from megatron_lite.data.corpus import BadLineError
from megatron_lite.errors import DataError

Example = tuple[np.ndarray, np.ndarray]  # token ids, 0/1 loss mask
LOSS_MASK_SUFFIX = "_loss_mask"


def loss_mask_prefix(prefix: str) -> str:
    """Where the loss masks of the token files at `prefix` are (a `.bin/.idx` pair of uint8)."""
    return prefix + LOSS_MASK_SUFFIX


def _string(obj: dict, key: str, path: str, lineno: int) -> str:
    if not isinstance(obj.get(key), str):
        raise BadLineError(path, lineno, f"{key!r} must be a string")
    return obj[key]


def _messages(value: object, path: str, lineno: int) -> list[dict]:
    try:
        return check_messages(value, f"{path}:{lineno}")
    except DataError as e:
        raise BadLineError(path, lineno, str(e).split(": ", 1)[-1]) from None


def _example(fmt: ChatFormat, messages: list[dict], path: str, lineno: int) -> Example:
    ids, mask = fmt.encode(messages)
    if not any(mask):
        raise BadLineError(path, lineno, "no assistant message: nothing to train on")
    return np.asarray(ids, np.int64), np.asarray(mask, np.uint8)


def sft_example(obj: dict, fmt: ChatFormat, path: str, lineno: int) -> Example:
    """(ids, mask) of one SFT record."""
    if "messages" in obj:
        return _example(fmt, _messages(obj["messages"], path, lineno), path, lineno)
    if "prompt" in obj and "response" in obj:
        prompt, response = (_string(obj, k, path, lineno) for k in ("prompt", "response"))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return _example(fmt, messages, path, lineno)
    raise BadLineError(
        path, lineno, f"expected 'messages', or 'prompt' and 'response'; the line has {sorted(obj)}"
    )


def _response_only(fmt: ChatFormat, conversation: list[dict], path: str, lineno: int) -> Example:
    """(ids, mask) of a conversation with only its final assistant turn in the mask."""
    if conversation[-1]["role"] != "assistant":
        raise BadLineError(path, lineno, "a DPO conversation must end with an assistant turn")
    ids, mask = _example(fmt, conversation, path, lineno)
    prompt_ids, _ = fmt.encode(conversation[:-1], add_generation_prompt=True)
    if list(ids[: len(prompt_ids)]) != prompt_ids:
        raise BadLineError(path, lineno, "the chat template does not render the prompt as a prefix")
    mask[: len(prompt_ids)] = 0
    return ids, mask


def dpo_example(obj: dict, fmt: ChatFormat, path: str, lineno: int) -> tuple[Example, Example]:
    """(chosen, rejected) of one preference record."""
    if "chosen" not in obj or "rejected" not in obj:
        raise BadLineError(
            path, lineno, f"expected 'chosen' and 'rejected'; the line has {sorted(obj)}"
        )
    pair = []
    for key in ("chosen", "rejected"):
        if isinstance(obj[key], list):
            conversation = _messages(obj[key], path, lineno)
        else:
            reply = {"role": "assistant", "content": _string(obj, key, path, lineno)}
            prompt = obj.get("prompt")
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            conversation = [*_messages(prompt, path, lineno), reply]
        pair.append(_response_only(fmt, conversation, path, lineno))
    return pair[0], pair[1]
