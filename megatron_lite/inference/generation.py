"""Text generation from any checkpoint: greedy, temperature, top-k and top-p sampling with a KV cache.

    lm = load_model("checkpoints/gpt")            # megatron_lite (any layout) or a HF directory
    tok = build_generation_tokenizer(lm)
    out = generate(lm, tok.tokenize("Hello"), 32, SamplingParams(temperature=0.8, top_p=0.9),
                   eod=tok.eod)

The model is built at this process's tp x pp (every rank calls the same functions with the same
arguments; `ParallelState.build(tp, pp)` under torchrun). `generate` and `generate_batch` are
requests run to the end on the continuous-batching engine (engine.py: the one decode step), every
rank scheduling alike. Each step runs the new tokens through the stages in turn (hidden states sent
stage to stage by `pipeline/p2p`; one token at a time leaves nothing to overlap, so pipeline
parallelism here is for models too big for one tp group). The last stage gathers the logits over
tp and samples; the token is broadcast to every rank of the model, so all extend the same sequence.
"""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

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
from megatron_lite.inference.engine import Engine, Request
from megatron_lite.inference.sampling import GenerationOutput, SamplingParams, sample
from megatron_lite.inference.validation import check_prompt
from megatron_lite.model import GPTModel, InferenceParams
from megatron_lite.model.gpt import WORD_EMBEDDING, chunk_layer_numbers
from megatron_lite.parallel_state import ParallelState
from megatron_lite.pipeline import p2p
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
        dev = device_mod.comm_device(ps.backend)
        if not first:  # the previous (virtual) stage's hidden states [s, b, h] ([s/tp, ...] SP)
            s = tokens.shape[1] // (ps.tp_size if self.cache_margin else 1)
            shape = (s, tokens.shape[0], self.cfg.model.hidden_size)
            (hidden,) = p2p.communicate([], [ps.prev_rank], shape=shape, dtype=param.dtype,
                                        device=dev)  # fmt: skip
            chunk.set_input_tensor(hidden.to(param.device))
        if position_ids is not None:
            position_ids = position_ids.to(param.device)
        out = chunk(tokens.to(param.device), position_ids, inference_params=inference_params)
        if not last:
            p2p.communicate([(out.to(dev), ps.next_rank)], [], shape=out.shape, dtype=out.dtype,
                            device=dev)  # fmt: skip
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


__all__ = ["SamplingParams", "sample", "GenerationOutput"]  # re-exported: the API's names
__all__ += ["LanguageModel", "load_model", "build_generation_tokenizer", "generate"]
__all__ += ["generate_batch", "inference_config"]


# ---------------------------------------------------------------------------------------------------
# The Python API: requests run to the end on the engine (the one decode loop)


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
    req = Request(prompt, max_new_tokens, params or SamplingParams(), seed, eod, stop,
                  use_cache=use_cache, return_logits=return_logits)  # fmt: skip
    return _run(lm, [req])[0]


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
    """`generate` for many prompts of different lengths in one batch, with the KV cache: each
    sequence stops on its own (after `eod`, or when `stop(i, new_tokens)` says so) and draws from
    its own generator (`seeds[i]`), so the result is what one `generate` per prompt gives."""
    params, seeds = params or SamplingParams(), seeds or [0] * len(prompts)
    reqs = [
        Request(p, max_new_tokens, params, s, eod, None if stop is None else partial(stop, i))
        for i, (p, s) in enumerate(zip(prompts, seeds))
    ]
    return _run(lm, reqs)


def _run(lm: LanguageModel, reqs: list[Request]) -> list[GenerationOutput]:
    """The requests on an engine of their own, every rank of the model in lockstep."""
    if not reqs or reqs[0].max_new_tokens < 1:  # nothing to generate: only the prompts' checks
        for r in reqs:
            check_prompt(r.prompt, 0, lm.max_length, lm.vocab_size)
        return [GenerationOutput([], "length", [] if r.return_logits else None) for r in reqs]
    longest = max(len(r.prompt) + r.max_new_tokens for r in reqs)
    engine = Engine(lm, len(reqs), lockstep=True, max_sequence_length=longest)
    return engine.run(reqs)
