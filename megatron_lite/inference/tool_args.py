"""What the checkpoint-reading tools (tools/generate.py, tools/evaluate.py) share: the flags that
name a checkpoint, its dtype and (optionally) another tokenizer, the model-parallel state of the
ranks torchrun started, the model and tokenizer those flags load, and the way out."""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from megatron_lite.config import TOKENIZER_TYPES
from megatron_lite.data.tokenizer import Tokenizer
from megatron_lite.inference.generation import LanguageModel, build_generation_tokenizer, load_model
from megatron_lite.parallel_state import ParallelState, init_distributed

TOKENIZER_FLAGS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--load, --iteration, --dtype and the tokenizer overrides."""
    p.add_argument("--load", required=True, help="Checkpoint or HF model directory.")
    p.add_argument("--iteration", type=int, help="Checkpoint iteration (default: the latest).")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    tok = p.add_argument_group("tokenizer (default: the checkpoint's)")
    tok.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES)
    tok.add_argument("--vocab-file")
    tok.add_argument("--merge-file")
    tok.add_argument("--tokenizer-model")
    tok.add_argument("--vocab-size", type=int)


def tool_parallel_state(tp: int | None, pp: int) -> ParallelState:
    """tp x pp over the ranks torchrun started (tp defaults to world / pp; dp takes the rest)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = tp or (world // pp if pp >= 1 else 0)
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(
            f"tp ({tp}) x --pipeline-model-parallel-size ({pp}) must divide the number of "
            f"ranks ({world})"
        )
    if world <= 1:
        return ParallelState.single()
    init_distributed()
    return ParallelState.build(tp=tp, pp=pp)


def load_for_tool(
    args: argparse.Namespace, ps: ParallelState, **load_kwargs
) -> tuple[LanguageModel, Tokenizer]:
    """The model of --load (at --iteration, in --dtype) and its tokenizer (or the one the flags give)."""
    lm = load_model(args.load, ps, dtype=args.dtype, iteration=args.iteration, **load_kwargs)
    tokenizer = build_generation_tokenizer(lm, **{k: getattr(args, k) for k in TOKENIZER_FLAGS})
    return lm, tokenizer


def finish_tool(rc: int) -> int:
    """Every rank done before the groups go (else gloo may abort a rank at exit); -> `rc`."""
    if dist.is_initialized():
        if rc == 0:
            dist.barrier()
        dist.destroy_process_group()
    return rc
