"""What one rank holds during training (`Run`), and how it is built from a Config."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite import checkpointing, device
from megatron_lite.config import Config
from megatron_lite.data import (
    build_pretraining_data_loader,
    build_tokenizer,
    build_train_valid_test_datasets,
    train_valid_test_num_samples,
)
from megatron_lite.data.sampler import cyclic_iter
from megatron_lite.distributed import DistributedDataParallel
from megatron_lite.model import build_model_chunks
from megatron_lite.model.context_parallel import CPBatchSlicer
from megatron_lite.optim import (
    MegatronOptimizer,
    NumMicroBatchesCalculator,
    OptimizerParamScheduler,
    build_lr_scheduler,
    build_num_microbatches_calculator,
    build_optimizer,
)
from megatron_lite.parallel_state import ParallelState, init_distributed
from megatron_lite.tensor_parallel import set_random_seed
from megatron_lite.timers import Timers
from megatron_lite.training.faults import FaultInjector
from megatron_lite.training.log import Writers, print_rank

if TYPE_CHECKING:
    from megatron_lite.data.tokenizer import Tokenizer


@dataclass
class Run:
    """Everything one rank holds during training."""

    cfg: Config
    ps: ParallelState
    device: torch.device
    tokenizer: Tokenizer
    padded_vocab_size: int
    model: list[DistributedDataParallel]  # this rank's model chunks
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    microbatches: NumMicroBatchesCalculator  # constant, or growing with --rampup-batch-size
    faults: FaultInjector = field(default_factory=FaultInjector)
    timers: Timers = field(default_factory=Timers)  # --timing-log-level
    # downstream evaluation the entry point installs (pretrain_gpt: --eval-tasks), each called as
    # hook(run, writers) every --eval-interval and after the last iteration; training imports none
    eval_hooks: list[Callable[[Run, Writers], object]] = field(default_factory=list)
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iters: int = 0
    nan_iters: int = 0

    @property
    def is_logging_rank(self) -> bool:
        """The last rank: last pipeline stage, last tp and dp rank (Megatron's choice)."""
        return self.ps.rank == self.ps.world_size - 1


def set_seeds(seed: int, ps: ParallelState) -> None:
    """Python and numpy get `seed`; torch and the tp tracker get Megatron's per-stage/per-tp streams."""
    random.seed(seed)
    np.random.seed(seed)
    set_random_seed(seed, ps.tp_rank, ps.pp_rank)


def setup(cfg: Config) -> Run:
    """Process groups, model chunks for this stage, DDP, optimizer, scheduler; loads --load if given."""
    init_distributed(cfg.parallel.distributed_backend, cfg.parallel.distributed_timeout_minutes)
    cfg.finalize(dist.get_world_size())
    ps = ParallelState.build(
        cfg.parallel.tensor_model_parallel_size,
        cfg.parallel.pipeline_model_parallel_size,
        cfg.virtual_pipeline_size,
        ep=cfg.moe.expert_model_parallel_size,
        etp=cfg.moe.expert_tensor_parallel_size,
        cp=cfg.parallel.context_parallel_size,
    )
    dev = device.get_device()
    device.set_device(dev)
    set_seeds(cfg.train.seed, ps)
    tokenizer = build_tokenizer(cfg.data)
    padded = cfg.padded_vocab_size(tokenizer.vocab_size)
    chunks = build_model_chunks(cfg, ps, padded, vocab_size=tokenizer.vocab_size)
    dtype = device.params_dtype(cfg.optim)
    model = [DistributedDataParallel(c.to(dev, dtype), cfg, ps) for c in chunks]
    optimizer = build_optimizer(cfg, model, ps)
    scheduler = build_lr_scheduler(cfg, optimizer)
    microbatches = build_num_microbatches_calculator(cfg)
    run = Run(cfg, ps, dev, tokenizer, padded, model, optimizer, scheduler, microbatches)
    run.faults = FaultInjector.from_env()
    run.timers = Timers(cfg.logging.timing_log_level, cfg.logging.timing_log_option, dev)
    ck = cfg.checkpoint
    # a fine-tuning run's first start: its --load (= --save) directory may not exist yet
    first_start = ck.pretrained_checkpoint and ck.load and not os.path.isdir(ck.load)
    loaded = bool(ck.load) and not first_start and _load(run, ck.load, ck.finetune)
    if cfg.checkpoint.load and not loaded and cfg.checkpoint.exit_on_missing_checkpoint:
        raise checkpointing.CheckpointError(
            f"--load {cfg.checkpoint.load}: no checkpoint there (no "
            f"{checkpointing.LATEST_FILE}) and --exit-on-missing-checkpoint is set"
        )
    if not loaded and cfg.checkpoint.pretrained_checkpoint:  # a fine-tuning run's first start
        if not _load(run, cfg.checkpoint.pretrained_checkpoint, finetune=True):
            raise checkpointing.CheckpointError(
                f"--pretrained-checkpoint {cfg.checkpoint.pretrained_checkpoint}: no checkpoint "
                f"there (no {checkpointing.LATEST_FILE})"
            )
    elif not loaded and cfg.checkpoint.load and run.is_logging_rank:
        print_rank(f"> no checkpoint in {cfg.checkpoint.load}: training from scratch")
    if run.is_logging_rank:
        n_params = sum(p.numel() for c in chunks for p in c.parameters())
        print_rank(
            f"> megatron_lite: world {ps.world_size} = tp {ps.tp_size} x pp {ps.pp_size} x dp "
            f"{ps.dp_size}{f' x cp {ps.cp_size}' if ps.cp_size > 1 else ''}, {cfg.num_microbatches} microbatches of {cfg.train.micro_batch_size}, "
            f"padded vocab {padded}, {n_params:,} parameters on the last rank, backend {ps.backend}"
        )
    return run


def _load(run: Run, path: str, finetune: bool) -> bool:
    """Load the checkpoint in `path` into `run` (weights only under `finetune`: the iteration,
    optimizer and RNG start afresh); False when `path` holds none."""
    cfg = run.cfg
    state = checkpointing.load_checkpoint(
        path,
        run.model,
        run.optimizer,
        run.scheduler,
        cfg,
        run.ps,
        load_optim=not (cfg.checkpoint.no_load_optim or finetune),
        load_rng=not (cfg.checkpoint.no_load_rng or finetune),
        finetune=finetune,
        vocab_size=run.tokenizer.vocab_size,
    )
    if state["loaded"]:
        run.iteration, run.consumed_samples = state["iteration"], state["consumed_samples"]
        if run.is_logging_rank:
            print_rank(
                f"> loaded checkpoint from {path} at iteration {run.iteration} (consumed "
                f"samples {run.consumed_samples})"
            )
    return bool(state["loaded"])


def build_data_iterators(
    cfg: Config, tokenizer, ps: ParallelState, consumed_samples: int, num_chunks: int
) -> tuple:
    """(train, valid, test) iterators; one per model chunk (the interleaved schedule reads each
    microbatch once per chunk), or None for a split that --split leaves empty."""
    datasets = build_train_valid_test_datasets(cfg, tokenizer, train_valid_test_num_samples(cfg))
    mbs = cfg.train.micro_batch_size
    iterators = []
    for ds, consumed, forever in zip(datasets, (consumed_samples, 0, 0), (False, True, True)):
        if ds is None:
            iterators.append(None)
            continue
        per_chunk = []
        for _ in range(num_chunks):
            loader = build_pretraining_data_loader(
                ds, consumed, mbs, ps.dp_rank, ps.dp_size, cfg.data.num_workers
            )
            if ps.cp_size > 1:  # same samples across the cp group, each rank its chunks
                loader = CPBatchSlicer(loader, ps.cp_rank, ps.cp_size)
            per_chunk.append(cyclic_iter(loader) if forever else iter(loader))
        iterators.append(per_chunk if num_chunks > 1 else per_chunk[0])
    return tuple(iterators)
