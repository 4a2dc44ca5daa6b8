"""Megatron-LM legacy checkpoints (`--ckpt-format torch`) as users have them load unchanged.

megatron-core (PyPI) builds the real `GPTModel` on the CPU with its local layer spec (GPT-2 and Llama
flavours), which gives real state dicts; its forward needs CUDA, so the loaded model's logits are
checked against transformers on the HF export of the same weights (an independent path). The files
are written the way Megatron-LM's `save_checkpoint` lays them out: `args` a pickled
`argparse.Namespace` (with megatron's own `AttnBackend` enum inside), `rng_state` with numpy's RNG
state, stage-local layer numbers in pp > 1 files, `model0`/`model1` under virtual pipelining, and
Transformer Engine's fused-norm names.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from launch_util import ROOT, TINY_GPT, losses, run_pretrain

from megatron_lite.checkpointing import CheckpointError
from megatron_lite.checkpointing.megatron import MegatronReader, is_megatron_dir
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.inference.generation import load_model

pytest.importorskip("megatron.core")  # megatron-core, installed by `make test`
pytest.importorskip("transformers")

SHAPE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab=127)
GPT2 = dict(flavour="gpt2", num_query_groups=4, ffn_hidden_size=256)
LLAMA = dict(flavour="llama", num_query_groups=2, ffn_hidden_size=96)
TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def _mcore_state_dict(flavour: str, num_query_groups: int, ffn_hidden_size: int) -> dict:
    """megatron-core's GPTModel (tp 1, pp 1, local spec) state dict, built in a 1-rank group."""
    model = mcore_model(flavour, num_query_groups, ffn_hidden_size)
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}


def mcore_model(flavour: str, num_query_groups: int, ffn_hidden_size: int):
    """megatron-core's GPTModel (tp 1, pp 1, local spec), every tensor random (in a 1-rank group)."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    llama = flavour == "llama"
    cfg = TransformerConfig(
        num_layers=SHAPE["num_layers"],
        hidden_size=SHAPE["hidden_size"],
        num_attention_heads=SHAPE["num_attention_heads"],
        num_query_groups=num_query_groups,
        ffn_hidden_size=ffn_hidden_size,
        normalization="RMSNorm" if llama else "LayerNorm",
        gated_linear_unit=llama,
        activation_func=F.silu if llama else F.gelu,
        add_bias_linear=not llama,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
    )
    torch.manual_seed(3)
    model = GPTModel(
        cfg,
        get_gpt_layer_local_spec(normalization=cfg.normalization),
        vocab_size=128,  # Megatron builds the padded vocabulary: 127 + eod -> 128
        max_sequence_length=SHAPE["seq_length"],
        position_embedding_type="rope" if llama else "learned_absolute",
        share_embeddings_and_output_weights=not llama,
    )
    with torch.no_grad():  # mcore zero-inits biases and ones norms: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _args(flavour: str, tp: int, pp: int, num_query_groups: int, ffn_hidden_size: int):
    from megatron.core.transformer.enums import AttnBackend

    llama = flavour == "llama"
    return argparse.Namespace(
        num_layers=SHAPE["num_layers"],
        hidden_size=SHAPE["hidden_size"],
        num_attention_heads=SHAPE["num_attention_heads"],
        ffn_hidden_size=ffn_hidden_size,
        kv_channels=SHAPE["hidden_size"] // SHAPE["num_attention_heads"],
        group_query_attention=num_query_groups != SHAPE["num_attention_heads"],
        num_query_groups=num_query_groups,
        seq_length=SHAPE["seq_length"],
        max_position_embeddings=SHAPE["seq_length"],
        position_embedding_type="rope" if llama else "learned_absolute",
        rotary_base=10000,
        normalization="RMSNorm" if llama else "LayerNorm",
        norm_epsilon=1e-5,
        swiglu=llama,
        openai_gelu=False,
        add_bias_linear=not llama,
        untie_embeddings_and_output_weights=llama,
        make_vocab_size_divisible_by=128,
        padded_vocab_size=128,
        tokenizer_type="NullTokenizer",
        vocab_size=SHAPE["vocab"],
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        consumed_train_samples=24,
        attention_backend=AttnBackend.auto,  # megatron's own enum, as real args hold
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
        transformer_impl="transformer_engine",
    )


def _split(name: str, t: torch.Tensor, tp: int, swiglu: bool) -> list[torch.Tensor]:
    """Megatron's tp shards of a full tensor: column-parallel rows, row-parallel columns, fc1 of
    SwiGLU as [gate_r; up_r] on each rank, the rest replicated."""
    if tp == 1 or not torch.is_tensor(t):
        return [t] * tp
    if "linear_fc1" in name and swiglu:
        gate, up = t.chunk(2, dim=0)
        return [torch.cat(p) for p in zip(gate.chunk(tp), up.chunk(tp))]
    if name.endswith(
        ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")
    ):
        return list(t.chunk(tp, dim=0))
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return list(t.chunk(tp, dim=0))
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return list(t.chunk(tp, dim=1))
    return [t] * tp


def _stage_of(name: str, pp: int, vpp: int) -> tuple[int, int, str]:
    """(pipeline rank, chunk, stage-local name) of a full-model name."""
    layers = SHAPE["num_layers"]
    if name.startswith("decoder.layers."):
        i, rest = name.split(".", 3)[2:]
        per = layers // (pp * vpp)
        virtual = int(i) // per
        return virtual % pp, virtual // pp, f"decoder.layers.{int(i) % per}.{rest}"
    if name.startswith("embedding."):
        return 0, 0, name
    return pp - 1, vpp - 1, name


def write_megatron(root, full: dict, flavour: str, tp: int, pp: int, vpp: int = 1, te: bool = False,
                   iteration: int = 3, extra_args: dict | None = None, **shape) -> None:  # fmt: skip
    swiglu = flavour == "llama"
    files: dict[tuple[int, int], dict] = {}
    for name, t in full.items():
        if pp > 1 and name == "embedding.word_embeddings.weight" and flavour == "gpt2":
            # tied at pp > 1: the last stage keeps its copy as output_layer.weight, as Megatron does
            for r, s in enumerate(_split("output_layer.weight", t, tp, swiglu)):
                files.setdefault((r, pp - 1), {}).setdefault(vpp - 1, {})["output_layer.weight"] = s
        stage, chunk, local = _stage_of(name, pp, vpp)
        if te:
            for ours, theirs in TE_NAMES.items():
                local = local.replace(ours, theirs)
        for r, s in enumerate(_split(name, t, tp, swiglu)):
            files.setdefault((r, stage), {}).setdefault(chunk, {})[local] = s
    d = os.path.join(root, f"iter_{iteration:07d}")
    for (r, stage), chunks in files.items():
        sub = os.path.join(d, f"mp_rank_{r:02d}" + (f"_{stage:03d}" if pp > 1 else ""))
        os.makedirs(sub, exist_ok=True)
        args = _args(flavour, tp, pp, **shape)
        for k, v in (extra_args or {}).items():
            setattr(args, k, v)
        sd = {
            "args": args,
            "checkpoint_version": 3.0,
            "iteration": iteration,
            "optimizer": {"optimizer": {"state": {}, "param_groups": []}},
            "opt_param_scheduler": {"max_lr": 1e-3, "num_steps": 24},
            "rng_state": [
                {
                    "random_rng_state": random.getstate(),
                    "np_rng_state": np.random.get_state(),
                    "torch_rng_state": torch.get_rng_state(),
                    "rng_tracker_states": {},
                }
            ],
            "num_floating_point_operations_so_far": 0,
        }
        if vpp == 1:
            sd["model"] = chunks[0]
        else:
            sd.update({f"model{c}": chunks[c] for c in range(vpp)})
        torch.save(sd, os.path.join(sub, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


@pytest.fixture(scope="module")
def mcore():
    """flavour -> megatron-core's full state dict (tp 1), built once in a forked 1-rank group."""
    return {
        "gpt2": run_distributed(_mcore_state_dict, 1, "gpt2", 4, 256, timeout=300)[0],
        "llama": run_distributed(_mcore_state_dict, 1, "llama", 2, 96, timeout=300)[0],
    }


def _shape(flavour):
    d = GPT2 if flavour == "gpt2" else LLAMA
    return {k: v for k, v in d.items() if k != "flavour"}


LAYOUTS = [(1, 1, 1, False), (2, 1, 1, True), (1, 2, 1, False), (2, 2, 2, True)]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_every_megatron_layout_reads_back_megatron_cores_tensors(mcore, tmp_path, flavour):
    full = mcore[flavour]
    for tp, pp, vpp, te in LAYOUTS:
        root = tmp_path / f"tp{tp}pp{pp}vpp{vpp}"
        write_megatron(root, full, flavour, tp, pp, vpp, te, **_shape(flavour))
        assert is_megatron_dir(str(root))
        reader = MegatronReader(str(root))
        assert (reader.tp, reader.pp, reader.vpp, reader.iteration) == (
            tp,
            pp,
            vpp if vpp > 1 else None,
            3,
        )
        assert reader.consumed_samples == 24
        want = {k: v for k, v in full.items() if torch.is_tensor(v)}
        for name, t in want.items():
            assert torch.equal(reader.full_tensor(name), t), (tp, pp, vpp, te, name)
        assert reader.config["model"]["swiglu"] == (flavour == "llama")
        if flavour == "gpt2" and pp > 1:  # the last stage's tied copy, split as the embedding
            emb = full["embedding.word_embeddings.weight"]
            assert torch.equal(reader.full_tensor("output_layer.weight"), emb), (tp, pp)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_loaded_model_matches_transformers_on_the_hf_export(mcore, tmp_path, flavour):
    """convert.py --loader megatron --saver hf --check: our model on the Megatron files against
    transformers on the exported weights; and a tp2 x pp2 file gives the tp1 logits."""
    one, split = tmp_path / "tp1", tmp_path / "tp2pp2"
    write_megatron(one, mcore[flavour], flavour, 1, 1, **_shape(flavour))
    write_megatron(split, mcore[flavour], flavour, 2, 2, te=True, **_shape(flavour))
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools/checkpoint/convert.py"), "--loader", "megatron",
         "--saver", "hf", "--load-dir", str(split), "--save-dir", str(tmp_path / "hf"), "--check",
         "--check-tolerance", "1e-4"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0 and "check passed" in out.stdout, out.stdout + out.stderr
    tokens = torch.randint(0, SHAPE["vocab"], (2, 16), generator=torch.Generator().manual_seed(0))
    a = load_model(str(one), dtype=torch.float32).logits(tokens)
    b = load_model(str(split), dtype=torch.float32).logits(tokens)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class NotAllowed:
    """A class of the test module: pickled by reference, so a load would have to import it."""


def test_any_other_pickled_object_is_still_refused(mcore, tmp_path):
    root = tmp_path / "evil"
    write_megatron(root, mcore["gpt2"], "gpt2", 1, 1, extra_args={"hook": NotAllowed()},
                   **_shape("gpt2"))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"mp_rank_00/model_optim_rng.pt: not loadable"):
        MegatronReader(str(root))
    # a callable: the classic attack
    write_megatron(root, mcore["gpt2"], "gpt2", 1, 1, extra_args={"hook": os.system},
                   **_shape("gpt2"))  # fmt: skip
    with pytest.raises(CheckpointError, match="not loadable as a Megatron-LM checkpoint"):
        MegatronReader(str(root))


@pytest.mark.slow
def test_training_routes_load_a_megatron_checkpoint(mcore, tmp_path):
    """--load (with --use-checkpoint-args and --no-load-optim) continues at the saved iteration;
    without --no-load-optim it says why not; --finetune starts at iteration 1."""
    meg = tmp_path / "meg"
    write_megatron(meg, mcore["llama"], "llama", 2, 1, **_shape("llama"))
    flags = [f for f in TINY_GPT if f not in ("--vocab-size", "500")]
    flags = [
        *flags,
        "--vocab-size",
        str(SHAPE["vocab"]),
        "--train-iters",
        "5",
        "--use-checkpoint-args",
    ]
    flags += ["--load", str(meg), "--global-batch-size", "8"]
    refused = run_pretrain(1, flags, check=False)
    assert refused.returncode != 0
    assert "is a Megatron-LM checkpoint" in refused.stdout and "--no-load-optim" in refused.stdout
    resumed = run_pretrain(1, [*flags, "--no-load-optim"])
    assert sorted(losses(resumed.stdout)) == [4, 5], resumed.stdout[-2000:]
    assert "loaded checkpoint from" in resumed.stdout and "at iteration 3" in resumed.stdout
    tuned = run_pretrain(1, [*flags, "--finetune"])
    assert sorted(losses(tuned.stdout)) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_our_parameters_have_megatron_cores_names_and_shapes(mcore, flavour):
    """Our checkpoints' tensors (global names, tp 1) are megatron-core GPTModel's, key for key."""
    from megatron_lite.arguments import parse_args
    from megatron_lite.model import build_model_chunks
    from megatron_lite.parallel_state import ParallelState

    extra = []
    if flavour == "llama":
        extra = (
            "--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
        )
        extra += (
            "--untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2 "
        )
        extra = (extra + "--ffn-hidden-size 96").split()
    cfg = parse_args([*TINY_GPT, *extra, "--train-iters", "1"])
    ours = build_model_chunks(cfg, ParallelState.single(), 128)[0].state_dict()
    theirs = {k: tuple(v.shape) for k, v in mcore[flavour].items() if torch.is_tensor(v)}
    assert {k: tuple(v.shape) for k, v in ours.items()} == theirs
