"""Megatron-style flags fill the config dataclasses; every inconsistency names the flags and values."""

import json

import pytest

from megatron_lite.arguments import build_parser, parse_args
from megatron_lite.config import Config, ConfigError, ModelConfig, pad_vocab_size

MEGATRON_FLAGS = """
--num-layers 4 --hidden-size 256 --num-attention-heads 8 --ffn-hidden-size 1024 --seq-length 512
--max-position-embeddings 1024 --micro-batch-size 2 --global-batch-size 64
--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
--num-layers-per-virtual-pipeline-stage 1 --sequence-parallel --use-distributed-optimizer
--overlap-grad-reduce --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 10
--lr-decay-iters 900 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
--train-iters 1000 --seed 42 --bf16 --recompute-granularity full --recompute-method block
--data-path 0.7 a_text_document 0.3 b_text_document --split 98,2,0 --data-cache-path /tmp/c
--tokenizer-type GPT2BPETokenizer --vocab-file v.json --merge-file m.txt --save ck --load ck
--save-interval 100 --log-interval 5 --eval-interval 50 --eval-iters 3 --tensorboard-dir tb
--distributed-timeout-minutes 2 --distributed-backend gloo --disable-bias-linear --swiglu
--position-embedding-type rope --normalization RMSNorm --untie-embeddings-and-output-weights
--group-query-attention --num-query-groups 4 --no-masked-softmax-fusion
""".split()


def test_megatron_flags_fill_every_section():
    cfg = parse_args(MEGATRON_FLAGS)
    m, p, d, o, c, lg, t = (
        cfg.model,
        cfg.parallel,
        cfg.data,
        cfg.optim,
        cfg.checkpoint,
        cfg.logging,
        cfg.train,
    )
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (
        4,
        256,
        8,
        1024,
    )
    assert (m.seq_length, m.max_position_embeddings, m.kv_channels) == (512, 1024, 32)
    assert not m.add_bias_linear and m.swiglu and not m.tie_embeddings
    assert (m.position_embedding_type, m.normalization, m.num_query_groups) == (
        "rope",
        "RMSNorm",
        4,
    )
    assert not m.masked_softmax_fusion
    assert (m.recompute_granularity, m.recompute_method) == ("full", "block")
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (2, 2)
    assert p.num_layers_per_virtual_pipeline_stage == 1 and p.sequence_parallel
    assert p.use_distributed_optimizer and p.overlap_grad_reduce
    assert (p.distributed_backend, p.distributed_timeout_minutes) == ("gloo", 2.0)
    assert d.data_path == ["0.7", "a_text_document", "0.3", "b_text_document"]
    assert (d.split, d.data_cache_path, d.tokenizer_type) == (
        "98,2,0",
        "/tmp/c",
        "GPT2BPETokenizer",
    )
    assert (d.vocab_file, d.merge_file) == ("v.json", "m.txt")
    assert (o.lr, o.min_lr, o.lr_decay_style, o.lr_warmup_iters, o.lr_decay_iters) == (
        3e-4,
        3e-5,
        "cosine",
        10,
        900,
    )
    assert (o.weight_decay, o.adam_beta2, o.clip_grad, o.bf16, o.fp16) == (
        0.1,
        0.95,
        1.0,
        True,
        False,
    )
    assert (c.save, c.load, c.save_interval) == ("ck", "ck", 100)
    assert (lg.log_interval, lg.tensorboard_dir) == (5, "tb")
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters, t.seed) == (2, 64, 1000, 42)
    assert (t.eval_interval, t.eval_iters) == (50, 3)
    assert cfg.virtual_pipeline_size == 2


def test_derived_values_are_computed_once_in_finalize():
    cfg = parse_args(MEGATRON_FLAGS).finalize(world_size=8)
    assert cfg.data_parallel_size == 2
    assert cfg.num_microbatches == 64 // (2 * 2)
    assert cfg.padded_vocab_size(50257) == 50432  # multiple of 128 x tp=2 = 256
    assert pad_vocab_size(50257, 128, 1) == 50304


def test_defaults_follow_megatron():
    cfg = Config()
    assert cfg.model.ffn_hidden_size == 4 * cfg.model.hidden_size
    assert cfg.model.max_position_embeddings == cfg.model.seq_length
    assert cfg.model.num_query_groups == cfg.model.num_attention_heads  # no GQA: one group per head
    assert cfg.finalize(world_size=4).train.global_batch_size == 4  # micro x dp
    swiglu = ModelConfig(hidden_size=256, num_attention_heads=4, swiglu=True)
    assert swiglu.ffn_hidden_size == 704  # 8/3 x 256 rounded up to a multiple of 64


def test_config_round_trips_through_plain_json():
    cfg = parse_args(MEGATRON_FLAGS).finalize(world_size=8)
    data = json.loads(json.dumps(cfg.to_dict()))
    again = Config.from_dict(data)
    assert again == cfg


BAD = [
    (
        "--hidden-size 100 --num-attention-heads 12",
        r"--hidden-size \(100\) must be divisible by --num-attention-heads \(12\)",
    ),
    (
        "--num-attention-heads 4 --tensor-model-parallel-size 8 --hidden-size 64",
        r"--num-attention-heads \(4\) must be divisible by --tensor-model-parallel-size \(8\)",
    ),
    (
        "--num-layers 3 --pipeline-model-parallel-size 2",
        r"--num-layers \(3\) must be divisible by --pipeline-model-parallel-size \(2\)",
    ),
    (
        "--num-layers 4 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 3",
        r"must be divisible by --num-layers-per-virtual-pipeline-stage \(3\)",
    ),
    ("--num-layers-per-virtual-pipeline-stage 1", r"needs --pipeline-model-parallel-size > 1"),
    ("--bf16 --fp16", r"--bf16 and --fp16 are mutually exclusive"),
    ("--lr 1e-4 --min-lr 1e-3", r"--min-lr \(0.001\) must be between 0 and --lr \(0.0001\)"),
    (
        "--seq-length 100 --max-position-embeddings 50",
        r"--max-position-embeddings \(50\) must be at least --seq-length \(100\)",
    ),
    ("--num-layers 0", r"--num-layers must be positive, got 0"),
    ("--split 1,x,2", r"--split must be comma-separated numbers"),
    ("--split 1,2,3,4", r"--split needs 1 to 3 non-negative numbers"),
    ("--tokenizer-type GPT2BPETokenizer", r"needs --vocab-file and --merge-file"),
    ("--tokenizer-type SentencePieceTokenizer", r"needs --tokenizer-model"),
    ("--tokenizer-type NullTokenizer", r"needs a positive --vocab-size"),
    (
        "--group-query-attention --num-query-groups 3 --num-attention-heads 4",
        r"--num-attention-heads \(4\) must be divisible by --num-query-groups \(3\)",
    ),
    ("--recompute-method uniform", r"needs --recompute-granularity full"),
    ("--hidden-dropout 1.5", r"--hidden-dropout must be in \[0, 1\)"),
    ("--train-iters 10 --train-samples 100", r"only one of --train-iters and --train-samples"),
    (
        "--lr-warmup-iters 5 --lr-warmup-fraction 0.1",
        r"only one of --lr-warmup-fraction and --lr-warmup-iters",
    ),
    (
        "--sequence-parallel --tensor-model-parallel-size 2 --seq-length 7 --hidden-size 64",
        r"--seq-length \(7\) must be divisible by --tensor-model-parallel-size \(2\)",
    ),
    (
        "--pipeline-schedule zero-bubble --pipeline-model-parallel-size 2 --num-layers 4 "
        "--num-layers-per-virtual-pipeline-stage 1",
        r"zero-bubble does not support",
    ),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[b[0] for b in BAD])
def test_inconsistent_flags_exit_with_a_message_naming_them(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(flags.split())
    assert e.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


BAD_FINALIZE = [
    (
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2",
        6,
        r"world size \(6\) must be divisible by --tensor-model-parallel-size \(2\) x "
        r"--pipeline-model-parallel-size \(2\) = 4",
    ),
    (
        "--micro-batch-size 3 --global-batch-size 10",
        2,
        r"--global-batch-size \(10\) must be divisible by --micro-batch-size \(3\) x "
        r"data-parallel size \(2\) = 6",
    ),
    (
        "--num-layers 4 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 "
        "--global-batch-size 3",
        2,
        r"number of microbatches \(3 .*divisible by "
        r"--pipeline-model-parallel-size \(2\)",
    ),
    (
        "--rampup-batch-size 3 2 100 --global-batch-size 8 --micro-batch-size 2",
        1,
        r"--rampup-batch-size start \(3\) must be a positive multiple",
    ),
]


@pytest.mark.parametrize("flags,world,message", BAD_FINALIZE, ids=[b[0] for b in BAD_FINALIZE])
def test_inconsistent_sizes_for_the_world_are_rejected(flags, world, message):
    cfg = parse_args(flags.split())
    with pytest.raises(ConfigError, match=message):
        cfg.finalize(world)


def test_help_lists_megatron_flag_names():
    text = build_parser().format_help()
    for flag in (
        "--num-layers",
        "--tensor-model-parallel-size",
        "--use-distributed-optimizer",
        "--recompute-granularity",
        "--data-cache-path",
        "--mock-data",
        "--exit-signal-handler",
    ):
        assert flag in text


def test_per_split_data_paths_parse_like_megatron():
    cfg = parse_args(
        "--train-data-path 0.3 a 0.7 b --valid-data-path c --test-data-path d "
        "--tokenizer-type NullTokenizer --vocab-size 10".split()
    )
    d = cfg.data
    assert (d.train_data_path, d.valid_data_path, d.test_data_path) == (
        ["0.3", "a", "0.7", "b"], ["c"], ["d"]
    )  # fmt: skip
    assert d.data_path == []


def test_megatron_launch_script_flags_are_accepted_mapped_or_refused(capsys):
    """Flags of Megatron-LM launch scripts: implementation switches are accepted with one notice,
    old spellings map to their settings, features we lack are errors that say so."""
    cfg = parse_args(
        "--use-mcore-models --transformer-impl local --no-bias-gelu-fusion --log-throughput "
        "--use-rotary-position-embeddings --no-position-embedding --use-flash-attn "
        "--norm-epsilon 1e-6 --data-impl mmap --ckpt-format torch --tokenizer-type NullTokenizer "
        "--vocab-size 10".split()
    )
    m = cfg.model
    assert (m.position_embedding_type, m.attention_backend, m.layernorm_epsilon) == (
        "rope", "sdpa", 1e-6
    )  # fmt: skip
    notice = capsys.readouterr().err
    assert "--use-mcore-models" in notice and "--transformer-impl" in notice
    assert "--norm-epsilon" not in notice  # a real setting, not ignored
    for flags, message in [
        (
            "--num-experts 8 --expert-model-parallel-size 3",
            "--num-experts (8) must be divisible by --expert-model-parallel-size (3)",
        ),
        ("--ckpt-format zarr", "--ckpt-format: invalid choice: 'zarr'"),
        ("--num-experts 4 --ckpt-format torch_dist", "--ckpt-format torch_dist with --num-experts"),
        ("--no-position-embedding", "--no-position-embedding without --position-embedding-type rope"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args(flags.split())
        assert message in capsys.readouterr().err


def test_a_flag_error_is_printed_by_local_rank_0_only(capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # what torchrun gives the second rank of a node
    with pytest.raises(SystemExit) as e:
        parse_args(["--num-layers", "x"])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit):
        parse_args(["--num-layers", "x"])
    assert "--num-layers: invalid int value: 'x'" in capsys.readouterr().err


def test_save_retain_and_its_megatron_bridge_spelling(capsys):
    assert parse_args(["--save-retain", "3"]).checkpoint.save_retain == 3
    assert parse_args(["--most-recent-k", "-1"]).checkpoint.save_retain == -1
    with pytest.raises(SystemExit):
        parse_args(["--save-retain", "0"])
    assert "--save-retain must be at least 1 (or -1: keep all), got 0" in capsys.readouterr().err
