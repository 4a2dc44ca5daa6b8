"""The losses of a sweep of runs, as (N, D, loss) points for `scaling_laws.fit`.

A run is a directory holding `args.txt` (its pretrain_gpt flags, whitespace-separated, as
examples/scaling_sweep.sh writes them) and its losses: `train.log` (Megatron's log lines: the
"validation loss at iteration I | lm loss value: X" lines, or the training lines' "lm loss: X")
and/or TensorBoard event files under the run (scalars "lm loss validation" / "lm loss", written by
training.py). N counts the non-embedding parameters (Kaplan et al. 2020: the embeddings of tiny
models would dominate otherwise); D = iteration x global batch x sequence length.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass

from megatron_lite.arguments import parse_args
from megatron_lite.config import Config
from megatron_lite.data import build_tokenizer
from megatron_lite.model.gpt import build_meta_chunk

VALID_RE = re.compile(r" validation loss at iteration (\d+) \| lm loss value: ([0-9.]+E[+-]\d+)")
TRAIN_RE = re.compile(r" iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([0-9.]+E[+-]\d+) \|")
TB_TAGS = {"validation": "lm loss validation", "train": "lm loss"}


@dataclass
class Run:
    name: str
    cfg: Config
    params: int  # non-embedding
    tokens_per_iteration: int
    losses: dict[int, float]  # iteration -> loss

    def points(self, min_iteration: int = 1) -> list[tuple[float, float, float]]:
        """(N, D, loss) at each logged iteration from `min_iteration` on."""
        return [
            (self.params, it * self.tokens_per_iteration, loss)
            for it, loss in sorted(self.losses.items())
            if it >= min_iteration
        ]


def non_embedding_params(cfg: Config) -> int:
    """Parameters of the transformer layers and the final norm (no embeddings, no output layer)."""
    # the real model, all layers in one stage, on the meta device (nothing allocated)
    one = dataclasses.replace(
        cfg.parallel, pipeline_model_parallel_size=1, num_layers_per_virtual_pipeline_stage=None
    )
    model = build_meta_chunk(
        dataclasses.replace(cfg, parallel=one), 0, cfg.model.make_vocab_size_divisible_by
    )
    skip = ("embedding.", "output_layer.")
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


def vocab_size(cfg: Config) -> int:
    """The tokenizer's vocabulary padded as training pads it (else --vocab-size)."""
    if cfg.data.tokenizer_type is not None:
        vocab = build_tokenizer(cfg.data).vocab_size
    elif cfg.data.vocab_size is not None:
        vocab = cfg.data.vocab_size
    else:
        raise ValueError("the run names neither a tokenizer nor --vocab-size")
    return cfg.padded_vocab_size(vocab)


def read_log(path: str, split: str = "validation") -> dict[int, float]:
    regex = VALID_RE if split == "validation" else TRAIN_RE
    with open(path, encoding="utf-8", errors="replace") as f:
        return {int(m.group(1)): float(m.group(2)) for m in regex.finditer(f.read())}


def read_tensorboard(run_dir: str, split: str = "validation") -> dict[int, float]:
    files = glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)
    if not files:
        return {}
    # optional dependency, only for runs that logged to TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for d in sorted({os.path.dirname(f) for f in files}):
        acc = EventAccumulator(d, size_guidance={"scalars": 0})
        acc.Reload()
        if TB_TAGS[split] in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(TB_TAGS[split])})
    return out


def read_run(run_dir: str, split: str = "validation", source: str = "auto") -> Run:
    """One run of a sweep; `source`: log, tensorboard, or auto (the log when it has losses)."""
    args_path = os.path.join(run_dir, "args.txt")
    if not os.path.isfile(args_path):
        raise FileNotFoundError(f"--runs {run_dir}: no args.txt (the run's pretrain_gpt flags)")
    with open(args_path, encoding="utf-8") as f:
        cfg = parse_args(f.read().split(), prog="scaling_laws")
    losses: dict[int, float] = {}
    log = os.path.join(run_dir, "train.log")
    if source in ("auto", "log") and os.path.isfile(log):
        losses = read_log(log, split)
    if not losses and source in ("auto", "tensorboard"):
        losses = read_tensorboard(run_dir, split)
    if not losses:
        raise ValueError(f"--runs {run_dir}: no {split} losses in train.log or TensorBoard files")
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    return Run(
        os.path.basename(os.path.normpath(run_dir)), cfg, non_embedding_params(cfg), tokens, losses
    )
