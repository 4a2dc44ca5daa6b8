"""`Config`: every section of a run, the checks that need two of them, and the derived values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_lite.config.data import DataConfig
from megatron_lite.config.flags import flag_name, require
from megatron_lite.config.model import ModelConfig, pad_vocab_size
from megatron_lite.config.moe import MoEConfig, moe_layer_pattern
from megatron_lite.config.optim import OptimConfig
from megatron_lite.config.parallel import (
    ParallelConfig,
    check_context_parallel,
    check_world_size,
)
from megatron_lite.config.rampup import check_rampup, train_iters_for_samples
from megatron_lite.config.training import CheckpointConfig, LoggingConfig, TrainConfig

SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "train": TrainConfig,
    "moe": MoEConfig,
}


@dataclass
class Config:
    """Every setting of a run. Cross-section checks run here; `finalize` adds the derived values."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # derived by finalize(); None until then
    world_size: int | None = None
    data_parallel_size: int | None = None
    num_microbatches: int | None = None
    total_train_iters: int | None = None  # --train-iters, or from --train-samples and the ramp-up

    def __post_init__(self) -> None:
        m, p = self.model, self.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):  # split over tp
            v = getattr(m, name)
            require(
                v % tp == 0,
                f"{flag_name(ModelConfig, name)} ({v}) must be divisible by "
                f"--tensor-model-parallel-size ({tp})",
            )
        require(
            m.num_layers % pp == 0,
            f"--num-layers ({m.num_layers}) must be divisible by "
            f"--pipeline-model-parallel-size ({pp})",
        )
        if p.sequence_parallel:
            require(
                m.seq_length % tp == 0,
                f"--seq-length ({m.seq_length}) must be divisible by "
                f"--tensor-model-parallel-size ({tp}) under --sequence-parallel",
            )
        check_context_parallel(m, p, self.data, self.train)
        vl = p.num_layers_per_virtual_pipeline_stage
        if vl is not None:
            require(
                pp > 1,
                "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1",
            )
            require(
                (m.num_layers // pp) % vl == 0,
                f"layers per pipeline stage (--num-layers {m.num_layers} / "
                f"--pipeline-model-parallel-size {pp} = {m.num_layers // pp}) must be "
                f"divisible by --num-layers-per-virtual-pipeline-stage ({vl})",
            )
        if p.pipeline_schedule == "zero-bubble":
            require(
                vl is None,
                "--pipeline-schedule zero-bubble does not support "
                "--num-layers-per-virtual-pipeline-stage",
            )
        if self.moe.enabled:
            self._check_moe()

    def _check_moe(self) -> None:
        """MoE settings against the model and the tp layout (world-size checks: `finalize`)."""
        m, p, e = self.model, self.parallel, self.moe
        tp = p.tensor_model_parallel_size
        etp = e.expert_tensor_parallel_size or tp
        require(
            etp == tp,
            f"--expert-tensor-parallel-size ({etp}) must equal --tensor-model-parallel-size "
            f"({tp}): experts split over another tp degree are not supported",
        )
        ffn = self.moe_ffn_hidden_size
        require(
            ffn % tp == 0,
            f"--moe-ffn-hidden-size ({ffn}) must be divisible by --tensor-model-parallel-size ({tp})",
        )
        shared = e.moe_shared_expert_intermediate_size
        require(
            shared is None or shared % tp == 0,
            f"--moe-shared-expert-intermediate-size ({shared}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})",
        )
        moe_layer_pattern(e.moe_layer_freq, m.num_layers)  # raises on a bad list
        require(
            self.parallel.context_parallel_size == 1,
            "--num-experts with --context-parallel-size > 1 is not supported yet (the router's "
            "load-balancing statistics would need reducing over the cp group)",
        )
        require(
            self.checkpoint.ckpt_format == "torch",
            "--ckpt-format torch_dist with --num-experts is not supported yet (experts are saved by "
            "global index in the torch format only): use --ckpt-format torch",
        )

    @property
    def moe_ffn_hidden_size(self) -> int:
        """Each expert's MLP hidden size (--moe-ffn-hidden-size, default --ffn-hidden-size)."""
        return self.moe.moe_ffn_hidden_size or self.model.ffn_hidden_size

    @property
    def virtual_pipeline_size(self) -> int | None:
        vl = self.parallel.num_layers_per_virtual_pipeline_stage
        if vl is None:
            return None
        return self.model.num_layers // self.parallel.pipeline_model_parallel_size // vl

    def finalize(self, world_size: int) -> Config:
        """Derive data-parallel size and number of microbatches for `world_size` ranks."""
        p, t = self.parallel, self.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        cp = p.context_parallel_size  # the cp ranks of a sequence read the same samples
        check_world_size(world_size, tp, pp, cp)
        dp = world_size // (tp * pp * cp)
        ep = self.moe.expert_model_parallel_size
        require(
            dp % ep == 0,
            f"data-parallel size ({dp} = world {world_size} / (tp {tp} x pp {pp})) must be "
            f"divisible by --expert-model-parallel-size ({ep}): experts are split inside dp",
        )
        if t.global_batch_size is None:
            t.global_batch_size = t.micro_batch_size * dp
        per_step = t.micro_batch_size * dp
        require(
            t.global_batch_size % per_step == 0,
            f"--global-batch-size ({t.global_batch_size}) must be divisible by "
            f"--micro-batch-size ({t.micro_batch_size}) x data-parallel size ({dp}) "
            f"= {per_step}",
        )
        if t.rampup_batch_size is not None:
            check_rampup(t.rampup_batch_size, t.global_batch_size, per_step)
        num_micro = t.global_batch_size // per_step
        vpp = self.virtual_pipeline_size
        if vpp is not None and vpp > 1:
            require(
                num_micro % pp == 0,
                f"the interleaved schedule needs the number of microbatches ({num_micro} = "
                f"--global-batch-size / (--micro-batch-size x dp)) to be divisible by "
                f"--pipeline-model-parallel-size ({pp})",
            )
        self.world_size, self.data_parallel_size, self.num_microbatches = world_size, dp, num_micro
        self.total_train_iters = self._train_iters()
        return self

    def _train_iters(self) -> int | None:
        """--train-iters, or the iterations of a --train-samples run (its LR schedule in samples)."""
        t, o = self.train, self.optim
        if t.train_samples is None:
            require(
                o.lr_decay_samples is None and o.lr_warmup_samples == 0,
                "--lr-decay-samples and --lr-warmup-samples go with --train-samples; with "
                "--train-iters use --lr-decay-iters and --lr-warmup-iters",
            )
            return t.train_iters
        require(
            o.lr_decay_iters is None and o.lr_warmup_iters == 0,
            "--train-samples counts the LR schedule in samples: use --lr-decay-samples and "
            "--lr-warmup-samples (or --lr-warmup-fraction), not --lr-decay-iters or "
            "--lr-warmup-iters",
        )
        return train_iters_for_samples(t.train_samples, t.global_batch_size, t.rampup_batch_size)

    def padded_vocab_size(self, vocab_size: int) -> int:
        return pad_vocab_size(
            vocab_size,
            self.model.make_vocab_size_divisible_by,
            self.parallel.tensor_model_parallel_size,
        )

    def to_dict(self) -> dict:
        """Plain JSON-able data (stored in checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        sections = {name: SECTIONS[name](**d[name]) for name in SECTIONS if name in d}
        cfg = cls(**sections)
        for k in ("world_size", "data_parallel_size", "num_microbatches", "total_train_iters"):
            setattr(cfg, k, d.get(k))
        return cfg
