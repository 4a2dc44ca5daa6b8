"""Text generation from any checkpoint: greedy, temperature, top-k and top-p sampling with a KV cache.

    lm = load_model("checkpoints/gpt")            # megatron_lite (any layout) or a HF directory
    tok = build_generation_tokenizer(lm)
    out = generate(lm, tok.tokenize("Hello"), 32, SamplingParams(temperature=0.8, top_p=0.9),
                   eod=tok.eod)

The model is built at this process's tp x pp (every rank calls the same functions with the same
arguments; `ParallelState.build(tp, pp)` under torchrun). Each step runs the new tokens through the
stages in turn (hidden states sent stage to stage; one token at a time leaves nothing to overlap,
so pipeline parallelism here is for models too big for one tp group). The last stage gathers the
logits over tp and samples; the token is broadcast to every rank of the model, so all extend the
same sequence.
"""

from __future__ import annotations

import copy
import math
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lite import comm
from megatron_lite import device as device_mod
from megatron_lite.checkpointing import load_weights
from megatron_lite.checkpointing.hf_reader import (
    HFReader,
    open_checkpoint,
    parse_dtype,
    training_dtype,
)
from megatron_lite.config import Config
from megatron_lite.data.tokenizer import (
    Tokenizer,
    build_tokenizer,
)
from megatron_lite.model import GPTModel, InferenceParams
from megatron_lite.model.gpt import WORD_EMBEDDING, chunk_layer_numbers
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tensor_parallel.mappings import gather_from_tensor_model_parallel_region


def inference_config(config: dict, tp: int, pp: int = 1) -> Config:
    """The saved config at tp x pp, without dropout or recomputation."""
    d = copy.deepcopy(config)
    d["parallel"] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    d["model"].update(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        recompute_granularity=None,
        recompute_method=None,
    )
    for k in ("world_size", "data_parallel_size", "num_microbatches"):
        d[k] = None
    return Config.from_dict(d)


@dataclass
class LanguageModel:
    """A loaded model on this rank, with what generation needs to know about it."""

    model: GPTModel
    cfg: Config
    ps: ParallelState
    vocab_size: int  # true vocabulary: logits past it are padding
    path: str
    data_config: dict = field(default_factory=dict)  # how the checkpoint was tokenized
    chunks: list[GPTModel] | None = None  # this rank's virtual-pipeline chunks, when more than one

    @property
    def max_length(self) -> int:
        return self.cfg.model.max_position_embeddings

    @property
    def cache_margin(self) -> int:
        """Extra KV-cache slots a step needs: under sequence parallelism a step of s tokens runs
        as a multiple of tp (the real tokens first, padding after, overwritten by the next step)."""
        tp = self.ps.tp_size
        return tp - 1 if self.cfg.parallel.sequence_parallel and tp > 1 else 0

    @torch.no_grad()
    def logits(
        self,
        tokens: torch.Tensor,
        inference_params: InferenceParams | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Full logits [b, s, vocab] (gathered over tp) of `tokens` [b, s] on the last pipeline
        stage; None on the others (they pass their hidden states on). Every chunk of this rank runs
        in virtual-stage order (`chunks`: the interleaved schedule's, during training)."""
        s = tokens.shape[1]
        pad = (-s) % self.ps.tp_size if self.cache_margin else 0
        if pad:  # right padding: causal attention keeps it out of the real tokens' logits
            tokens = torch.nn.functional.pad(tokens, (0, pad))
            if position_ids is None:  # the positions the model would take, then the padding's
                position_ids = (
                    inference_params.position_ids(s)
                    if inference_params is not None
                    else torch.arange(s)[None]
                ).expand(tokens.shape[0], s)
            last = position_ids[:, -1:] + torch.arange(1, pad + 1)
            position_ids = torch.cat([position_ids, last.clamp(max=self.max_length - 1)], 1)
        out = None
        chunks = self.chunks or [self.model]
        for c, chunk in enumerate(chunks):
            out = self._chunk_forward(chunk, c, len(chunks), tokens, inference_params, position_ids)
        if out is None:
            return None
        out = gather_from_tensor_model_parallel_region(out, self.ps.tp_group)  # [b, s, V/tp] -> V
        return out[:, :s, : self.vocab_size]

    def _chunk_forward(self, chunk, c, v, tokens, inference_params, position_ids):
        ps, param = self.ps, next(chunk.parameters())
        first, last = ps.is_first_stage and c == 0, ps.is_last_stage and c == v - 1
        if not first:  # the previous (virtual) stage's hidden states [s, b, h] ([s/tp, ...] SP)
            s = tokens.shape[1] // (ps.tp_size if self.cache_margin else 1)
            shape = (s, tokens.shape[0], self.cfg.model.hidden_size)
            hidden = torch.empty(
                shape, dtype=param.dtype, device=device_mod.comm_device(ps.backend)
            )
            dist.recv(hidden, ps.prev_rank)
            chunk.set_input_tensor(hidden.to(param.device))
        if position_ids is not None:
            position_ids = position_ids.to(param.device)
        out = chunk(tokens.to(param.device), position_ids, inference_params=inference_params)
        if not last:
            dist.send(out.to(device_mod.comm_device(ps.backend)).contiguous(), ps.next_rank)
            return None
        return out


def _saved_dtype(reader) -> torch.dtype:
    if isinstance(reader, HFReader):
        return parse_dtype(reader.hf.get("dtype") or reader.hf.get("torch_dtype") or "float32")
    return training_dtype(reader.config)


def load_model(
    path: str,
    ps: ParallelState | None = None,
    *,
    dtype: torch.dtype | str | None = "auto",
    iteration: int | None = None,
    device: torch.device | None = None,
    data_parallel: bool = False,
) -> LanguageModel:
    """Build this rank's stage of the model at `ps`'s tp x pp and load `path` into it (any saved
    layout, or a HF directory) through the checkpoint loader's reshard path. `dtype` "auto": as
    saved. `data_parallel`: every dp replica loads the model (evaluation splits its requests)."""
    ps = ps or ParallelState.single()
    if ps.dp_size != 1 and not data_parallel:
        raise ValueError(f"generation runs one model replica: dp must be 1, got {ps.dp_size}")
    reader = open_checkpoint(path, iteration)
    cfg = inference_config(reader.config, ps.tp_size, ps.pp_size)
    vocab = reader.vocab_size or reader.full_tensor(WORD_EMBEDDING).shape[0]
    layers = chunk_layer_numbers(cfg.model.num_layers, ps.pp_size, ps.pp_rank, 1, 0)
    model = GPTModel(
        cfg,
        ps,
        cfg.padded_vocab_size(vocab),
        layers,
        pre_process=ps.is_first_stage,
        post_process=ps.is_last_stage,
        vocab_size=vocab,
    )
    load_weights(reader, [model], ps)
    if dtype == "auto":
        dtype = _saved_dtype(reader)
    elif isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    model.to(device or device_mod.get_device(), dtype).eval()
    data = dict(reader.config.get("data", {}))
    if isinstance(reader, HFReader):
        data.update(_hf_tokenizer(path))
    return LanguageModel(model, cfg, ps, vocab, path, data)


def _hf_tokenizer(path: str) -> dict:
    j = lambda name: os.path.join(path, name)  # noqa: E731
    if os.path.isfile(j("vocab.json")) and os.path.isfile(j("merges.txt")):
        return {
            "tokenizer_type": "GPT2BPETokenizer",
            "vocab_file": j("vocab.json"),
            "merge_file": j("merges.txt"),
        }
    if os.path.isfile(j("tokenizer.model")):
        return {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": j("tokenizer.model")}
    if os.path.isfile(j("tokenizer.json")):  # a fast tokenizer only (Llama 3, ...)
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": path}
    return {}


def build_generation_tokenizer(lm: LanguageModel, **overrides) -> Tokenizer:
    """The tokenizer the checkpoint names (HF: the files in its directory); `overrides` (tokenizer
    flags: tokenizer_type, vocab_file, merge_file, tokenizer_model, vocab_size) win where given."""
    data = {**lm.data_config, **{k: v for k, v in overrides.items() if v is not None}}
    if data.get("tokenizer_type") is None and not data.get("mock_data"):
        raise ValueError(
            f"{lm.path} names no tokenizer: pass --tokenizer-type and its files (--vocab-file and "
            "--merge-file, or --tokenizer-model)"
        )
    return build_tokenizer(types.SimpleNamespace(**data))


# ---------------------------------------------------------------------------------------------------
# Sampling


@dataclass
class SamplingParams:
    """temperature 0 (or top_k 1) is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool)) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """Next token ids [b] from logits [b, vocab] (fp32 on the CPU, so every device draws alike)."""
    logits = logits.float().cpu()
    if params.greedy:
        return logits.argmax(-1)
    # scaled from the max (0 there, <= 0 elsewhere): any temperature > 0 stays finite, and one so
    # small that every other token underflows to -inf is greedy (1e-40 used to give NaN probs)
    logits = (logits - logits.max(-1, keepdim=True).values) / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1:
        # keep the most likely tokens until their mass reaches top_p (always the first one)
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _broadcast_token(t: torch.Tensor | None, ps: ParallelState, batch: int = 1) -> torch.Tensor:
    """The token sampled on the last stage's tp rank 0, on every rank of the model (each rank must
    extend the same text); other ranks pass None."""
    if ps.tp_size * ps.pp_size == 1:
        return t
    dev = device_mod.comm_device(ps.backend)
    buf = t.to(dev) if t is not None else torch.zeros(batch, dtype=torch.long, device=dev)
    comm.broadcast(buf, ps.mp_ranks[(ps.pp_size - 1) * ps.tp_size], ps.mp_group)
    return buf.cpu()


@dataclass
class GenerationOutput:
    tokens: list[int]  # the new tokens (the end-of-document token included when it stopped there)
    finish_reason: str  # "eod", "length" or "stop"
    step_logits: list[torch.Tensor] | None = None  # [vocab] fp32 per step (last stage), on request


@torch.no_grad()
def generate(
    lm: LanguageModel,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    eod: int | None = None,
    use_cache: bool = True,
    seed: int = 0,
    return_logits: bool = False,
    stop: Callable[[list[int]], bool] | None = None,
) -> GenerationOutput:
    """Extend `prompt` by up to `max_new_tokens` tokens, stopping after `eod` (end of document).

    With `use_cache` the prompt runs once and each later step feeds only the newest token against
    the cached keys/values; without it every step runs the whole sequence (same result, slower).
    `stop(new_tokens)` true ends it too (finish_reason "stop"): evaluation's stop sequences.
    """
    params = params or SamplingParams()
    _check_prompt(lm, prompt, max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    seq = torch.tensor([prompt], dtype=torch.long)
    cache = (
        InferenceParams(1, len(prompt) + max_new_tokens + lm.cache_margin) if use_cache else None
    )
    new, logged, reason = [], [], "length"
    step_input = seq
    for _ in range(max_new_tokens):
        logits = lm.logits(step_input if use_cache else seq, cache)  # [1, s, vocab] | None
        if cache is not None:
            cache.sequence_len_offset += step_input.shape[1]
        token = None
        if logits is not None:  # the last pipeline stage
            logits = logits[:, -1]
            if return_logits:
                logged.append(logits[0].float().cpu())
            token = sample(logits, params, generator)
        token = _broadcast_token(token, lm.ps)
        new.append(int(token[0]))
        if eod is not None and new[-1] == eod:
            reason = "eod"
            break
        if stop is not None and stop(new):
            reason = "stop"
            break
        step_input = token.view(1, 1)
        seq = torch.cat([seq, step_input], dim=1)
    return GenerationOutput(new, reason, logged if return_logits else None)


def _check_prompt(lm: LanguageModel, prompt: list[int], max_new_tokens: int) -> None:
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if len(prompt) + max_new_tokens > lm.max_length:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's {lm.max_length} positions"
        )
    if any(not 0 <= t < lm.vocab_size for t in prompt):
        raise ValueError(f"prompt token ids must be in [0, {lm.vocab_size})")


def generate_batch(
    lm: LanguageModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    eod: int | None = None,
    seeds: list[int] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
) -> list[GenerationOutput]:
    """`generate` for many prompts of different lengths in one batch, with the KV cache.

    Prompts are left-padded to the longest: padding slots are masked out of every real token's
    attention, learned positions count from each prompt's first token, and rotary embeddings,
    which see only position differences, need no shift. Each sequence stops on its own (after
    `eod`, or when `stop(i, new_tokens)` says so) and draws from its own generator (`seeds[i]`),
    so the result is what one `generate` per prompt gives.
    """
    params = params or SamplingParams()
    for p in prompts:
        _check_prompt(lm, p, max_new_tokens)
    b, longest = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts])
    total = longest + max_new_tokens + lm.cache_margin
    slots = torch.arange(total)
    cache = InferenceParams(b, total, key_padding=slots[None] < pad[:, None])
    step_input = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], dtype=torch.long)
    positions = (slots[None, :longest] - pad[:, None]).clamp(min=0)
    generators = [torch.Generator().manual_seed(s) for s in (seeds or [0] * b)]
    new: list[list[int]] = [[] for _ in range(b)]
    reasons: list[str | None] = [None] * b
    for _ in range(max_new_tokens):
        logits = lm.logits(step_input, cache, positions)  # [b, s, vocab] | None
        cache.sequence_len_offset += step_input.shape[1]
        tokens = None
        if logits is not None:  # the last pipeline stage
            rows = logits[:, -1]
            tokens = torch.cat(
                [sample(rows[i : i + 1], params, g) for i, g in enumerate(generators)]
            )
        tokens = _broadcast_token(tokens, lm.ps, b)
        for i in range(b):
            if reasons[i] is not None:
                continue
            new[i].append(int(tokens[i]))
            if eod is not None and new[i][-1] == eod:
                reasons[i] = "eod"
            elif stop is not None and stop(i, new[i]):
                reasons[i] = "stop"
        if all(r is not None for r in reasons):
            break
        step_input = tokens.view(b, 1)
        positions = (cache.sequence_len_offset - pad).view(b, 1)
    return [GenerationOutput(t, r or "length", None) for t, r in zip(new, reasons)]
