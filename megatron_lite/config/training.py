"""The run itself: batch sizes and length (TrainConfig), checkpoints, logging."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config.flags import flag, positive, require


@dataclass
class CheckpointConfig:
    save: str | None = flag(None, "Directory to save checkpoints in.")
    load: str | None = flag(None, "Directory to load a checkpoint from.")
    save_interval: int | None = flag(None, "Iterations between checkpoints.", type=int)
    no_load_optim: bool = flag(False, "Do not load optimizer state.", action="store_true")
    no_load_rng: bool = flag(False, "Do not load RNG states.", action="store_true")
    no_save_optim: bool = flag(False, "Do not save optimizer state.", action="store_true")
    no_save_rng: bool = flag(False, "Do not save RNG states.", action="store_true")
    finetune: bool = flag(
        False, "Load weights only; restart iteration count and optimizer.", action="store_true"
    )
    pretrained_checkpoint: str | None = flag(
        None,
        "Fine-tuning: when --load holds no checkpoint (a first start), load this one's weights "
        "as --finetune would; later starts resume from --load.",
    )
    use_checkpoint_args: bool = flag(
        False,
        "Take the model's shape and the tokenizer (unless given) from the --load checkpoint.",
        action="store_true",
    )
    exit_on_missing_checkpoint: bool = flag(
        False, "With --load: stop with an error when it holds no checkpoint.", action="store_true"
    )
    save_retain: int | None = flag(
        None,
        "Keep only the N most recent checkpoints in --save, deleting older ones after each save "
        "(never the one latest_checkpointed_iteration.txt names); -1: keep all.",
        type=int,
        aliases=("--most-recent-k",),
    )

    def __post_init__(self) -> None:
        positive(self, "save_interval")
        require(
            self.save_retain in (None, -1) or self.save_retain >= 1,
            f"--save-retain must be at least 1 (or -1: keep all), got {self.save_retain}",
        )


@dataclass
class LoggingConfig:
    log_interval: int = flag(100, "Iterations between log lines.", type=int)
    tensorboard_dir: str | None = flag(None, "Where TensorBoard event files go.")
    peak_tflops: float | None = flag(None, "Peak TFLOP/s per device, for MFU.", type=float)
    log_memory: bool = flag(
        True, "Do not report memory use.", name="--no-log-memory", action="store_false"
    )
    log_params_norm: bool = flag(
        False, "Log the L2 norm of all parameters (each counted once).", action="store_true"
    )
    wandb_project: str | None = flag(None, "Weights & Biases project (enables W&B logging).")
    wandb_exp_name: str | None = flag(None, "Weights & Biases run name.")
    wandb_save_dir: str | None = flag(None, "Where W&B keeps its run files (default ./wandb).")
    timing_log_level: int = flag(
        0,
        "Per-region timers in the log: 0 none, 1 forward-backward / grad sync / optimizer, "
        "2 also data loading and pipeline p2p.",
        type=int,
        choices=[0, 1, 2],
    )
    timing_log_option: str = flag(
        "minmax",
        "How timers are reported across ranks.",
        choices=["max", "minmax", "all"],
    )
    log_timers_to_tensorboard: bool = flag(
        False, "Also write the timers to TensorBoard (and W&B).", action="store_true"
    )
    profile: bool = flag(
        False,
        "Profile --profile-step-start..--profile-step-end (with --use-pytorch-profiler: "
        "torch.profiler traces in --tensorboard-dir; else an nsys capture range on CUDA).",
        action="store_true",
    )
    use_pytorch_profiler: bool = flag(
        False,
        "Profile with torch.profiler (traces for TensorBoard or Perfetto).",
        action="store_true",
    )
    profile_step_start: int = flag(10, "First iteration profiled.", type=int)
    profile_step_end: int = flag(12, "Iteration at which profiling stops (not profiled).", type=int)
    profile_ranks: list[int] = flag([0], "Global ranks that profile.", nargs="+", type=int)

    def __post_init__(self) -> None:
        positive(self, "log_interval", "peak_tflops")
        if self.profile:
            require(
                0 < self.profile_step_start < self.profile_step_end,
                f"--profile-step-start ({self.profile_step_start}) must be positive and less "
                f"than --profile-step-end ({self.profile_step_end})",
            )
            require(
                not self.use_pytorch_profiler or self.tensorboard_dir is not None,
                "--use-pytorch-profiler writes its traces into --tensorboard-dir: give one",
            )


@dataclass
class TrainConfig:
    micro_batch_size: int = flag(1, "Samples per microbatch per data-parallel rank.", type=int)
    global_batch_size: int | None = flag(
        None, "Samples per iteration over all data-parallel ranks (default micro x dp).", type=int
    )
    rampup_batch_size: list[int] | None = flag(
        None, "start increment samples: grow the global batch linearly.", nargs=3, type=int
    )
    train_iters: int | None = flag(None, "Iterations to train.", type=int)
    train_samples: int | None = flag(None, "Samples to train (instead of --train-iters).", type=int)
    eval_interval: int = flag(1000, "Iterations between validation runs.", type=int)
    eval_iters: int = flag(100, "Validation batches per evaluation.", type=int)
    eval_tasks: list[str] | None = flag(
        None,
        "Downstream tasks scored at each --eval-interval: NAME or NAME=PATH "
        "(lambada, hellaswag, arc_easy, arc_challenge, piqa, mmlu, humaneval, perplexity).",
        nargs="+",
    )
    eval_tasks_dir: str | None = flag(None, "Where --eval-tasks given without a path are found.")
    eval_num_fewshot: int = flag(0, "Solved examples per prompt for --eval-tasks.", type=int)
    seed: int = flag(1234, "Random seed.", type=int)
    exit_interval: int | None = flag(
        None, "Save and exit at an iteration divisible by this.", type=int
    )
    exit_duration_in_mins: float | None = flag(
        None, "Save and exit after this many minutes.", type=float
    )
    exit_signal_handler: bool = flag(False, "Save and exit on SIGTERM.", action="store_true")
    check_for_nan_in_loss: bool = flag(
        False, "Stop with an error on a nan/inf loss.", action="store_true"
    )
    dpo_beta: float = flag(
        0.1, "--dpo: the KL weight beta of the DPO loss (Rafailov et al. 2023).", type=float
    )

    def __post_init__(self) -> None:
        positive(
            self,
            "micro_batch_size",
            "global_batch_size",
            "train_iters",
            "train_samples",
            "eval_interval",
            "exit_interval",
            "exit_duration_in_mins",
            "dpo_beta",
        )
        require(self.eval_iters >= 0, f"--eval-iters must be non-negative, got {self.eval_iters}")
        require(
            self.eval_num_fewshot >= 0,
            f"--eval-num-fewshot must be non-negative, got {self.eval_num_fewshot}",
        )
        require(
            not (self.train_iters and self.train_samples),
            "use only one of --train-iters and --train-samples",
        )
