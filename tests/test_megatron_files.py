"""Our `--ckpt-format torch` files are ones Megatron-LM's `load_checkpoint` reads.

Real GPT models (GPT-2 flavour, default `--make-vocab-size-divisible-by 128`) are saved at tp 1,
tp 2 x pp 2 and tp 1 x pp 2 x vpp 2 by `save_checkpoint`. megatron-core's own `GPTModel` (local spec,
tp 1, built on the CPU with each stage's layer count and pre/post-process) is the reference: every
file's `model` / `model<i>` entry has its keys, and its shapes divided by tp where megatron-core marks
a parameter tensor-parallel; the tp 1 file loads into it with `load_state_dict(strict=True)` and gives
back our tensors. The files load with `torch.load(weights_only=True)` and only argparse.Namespace
allowed, carry the `args` fields Megatron's `check_checkpoint_args` compares, and a file in our
previous layout (a list of chunk dicts with global names) still loads.
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.distributed as dist
from factory import tiny_config

from megatron_lite import checkpointing as ckpt
from megatron_lite.checkpointing import CheckpointReader
from megatron_lite.checkpointing.hf_reader import open_checkpoint
from megatron_lite.checkpointing.megatron import is_megatron_dir
from megatron_lite.checkpointing.torch_format import OPTIMIZER_KEY, RNG_KEY
from megatron_lite.config import Config
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.model.gpt import build_model_chunks
from megatron_lite.parallel_state import ParallelState

pytest.importorskip("megatron.core")

VOCAB, LAYERS, HIDDEN, HEADS, SEQ = 127, 4, 64, 4, 32
PADDED = {1: 128, 2: 256}  # Megatron's rule: a multiple of 128 x tp
# what Megatron-LM's check_checkpoint_args / load_checkpoint read from `args`
MEGATRON_READS = (
    "num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
    "max_position_embeddings", "make_vocab_size_divisible_by", "padded_vocab_size",
    "tokenizer_type", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "consumed_train_samples",
)  # fmt: skip


def _cfg(tp: int, pp: int, vl: int | None, world: int) -> Config:
    return tiny_config(
        world, num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        max_position_embeddings=SEQ, seq_length=SEQ, tp=tp, pp=pp, vl=vl,
        vocab_size=VOCAB, global_batch_size=8,
    )  # fmt: skip


def _save(root: str, tp: int, pp: int, vl: int | None) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg = _cfg(tp, pp, vl, world)
    ps = ParallelState.build(tp, pp) if world > 1 else ParallelState.single()
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(VOCAB))
    ckpt.save_checkpoint(root, 7, chunks, None, None, cfg, ps, consumed_samples=56)


def _mcore_reference(specs: list[dict]) -> list[dict]:
    """In a 1-rank group, per (file, model key) spec: megatron-core's expected {key: shape, or None
    for `_extra_state`}; for `strict` specs, the names whose tensors differ after a strict load."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(1, 1)
    out = []
    for spec in specs:
        cfg = TransformerConfig(
            num_layers=spec["layers"],
            hidden_size=HIDDEN,
            num_attention_heads=HEADS,
            use_cpu_initialization=True,
            pipeline_dtype=torch.float32,
        )
        model = GPTModel(
            cfg,
            get_gpt_layer_local_spec(),
            vocab_size=PADDED[spec["tp"]],
            max_sequence_length=SEQ,
            pre_process=spec["pre"],
            post_process=spec["post"],
            share_embeddings_and_output_weights=True,
        )
        params = dict(model.named_parameters())
        expected = {}
        for k, v in model.state_dict().items():
            shape = list(v.shape) if torch.is_tensor(v) else None
            p = params.get(k)
            if p is not None and getattr(p, "tensor_model_parallel", False):
                shape[p.partition_dim] //= spec["tp"]
            expected[k] = shape
        result = {"expected": expected, "differ": None}
        if spec["strict"]:
            ours = _load_with_namespace_only(spec["path"])[spec["key"]]
            model.load_state_dict(ours, strict=True)  # raises on a missing or unexpected key
            result["differ"] = [
                k
                for k, v in model.state_dict().items()
                if torch.is_tensor(v) and not torch.equal(v, ours[k])
            ]
        out.append(result)
    return out


def _load_with_namespace_only(path: str) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _specs(root: str, tp: int, pp: int, vpp: int) -> list[dict]:
    """Every (file, model key) of a save, with the stage megatron-core would build for it."""
    per = LAYERS // (pp * vpp)
    specs = []
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            name = ckpt.mp_rank_name(tp_rank, pp_rank, pp)
            path = os.path.join(root, "iter_0000007", name, ckpt.MODEL_FILE)
            for c in range(vpp):
                specs.append(
                    dict(
                        path=path,
                        key="model" if vpp == 1 else f"model{c}",
                        layers=per,
                        pre=pp_rank == 0 and c == 0,
                        post=pp_rank == pp - 1 and c == vpp - 1,
                        tp=tp,
                        pp=pp,
                        strict=tp == pp == 1,
                    )
                )
    return specs


LAYOUTS = {"tp1": (1, 1, 1), "tp2pp2": (2, 2, 1), "tp1pp2vpp2": (1, 2, 2)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each layout saved once; megatron-core's reference for every file, built in one process."""
    base = tmp_path_factory.mktemp("megatron_files")
    roots = {name: str(base / name) for name in LAYOUTS}
    _save(roots["tp1"], 1, 1, None)
    run_distributed(_save, 4, roots["tp2pp2"], 2, 2, None, timeout=120)
    run_distributed(_save, 2, roots["tp1pp2vpp2"], 1, 2, 1, timeout=120)
    specs = [s for name, lay in LAYOUTS.items() for s in _specs(roots[name], *lay)]
    results = run_distributed(_mcore_reference, 1, specs, timeout=300)[0]
    return roots, list(zip(specs, results, strict=True))


@pytest.mark.slow
def test_every_file_is_megatron_cores_stage_by_name_and_shape(saved):
    """`model` / `model<i>` of every file: megatron-core's keys (stage-local layer numbers, its
    `_extra_state` entries) and shapes (divided by tp where split); tp1 loads strictly, equal."""
    _, pairs = saved
    assert len(pairs) == 1 + 4 + 4
    for spec, result in pairs:
        state = _load_with_namespace_only(spec["path"])
        model = state[spec["key"]]
        got = {k: list(v.shape) if torch.is_tensor(v) else v for k, v in model.items()}
        assert got == result["expected"], (spec["path"], spec["key"])
        if spec["strict"]:
            assert result["differ"] == [], result["differ"]
        layers = {int(k.split(".")[2]) for k in model if k.startswith("decoder.layers.")}
        assert layers == set(range(spec["layers"])), (spec, layers)  # numbered from 0 per stage


@pytest.mark.slow
def test_files_carry_what_megatron_lm_reads(saved):
    """Megatron's keys: checkpoint_version 3.0, iteration, args with the fields its
    check_checkpoint_args compares; ours under keys it does not read, so it asks for
    --no-load-optim / --no-load-rng rather than misreading them."""
    roots, pairs = saved
    for spec, _ in pairs:
        state = _load_with_namespace_only(spec["path"])
        args = state["args"]
        assert type(args) is argparse.Namespace
        assert (state["checkpoint_version"], state["iteration"]) == (3.0, 7)
        assert not {"optimizer", "rng_state"} & set(state)
        assert {OPTIMIZER_KEY, RNG_KEY, "shard_info"} <= set(state)
        missing = [f for f in MEGATRON_READS if not hasattr(args, f)]
        assert not missing, missing
        assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (
            LAYERS,
            HIDDEN,
            HEADS,
        )
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (
            spec["tp"],
            spec["pp"],
        )
        assert args.padded_vocab_size == PADDED[spec["tp"]]
        assert args.consumed_train_samples == 56 and args.add_position_embedding is True
        assert args.make_vocab_size_divisible_by == 128 and args.tokenizer_type == "NullTokenizer"
    for root in roots.values():  # carrying `args` does not make them Megatron-LM's own files
        assert not is_megatron_dir(root) and isinstance(open_checkpoint(root), CheckpointReader)
    vpp = _load_with_namespace_only(pairs[-1][0]["path"])["args"]
    assert vpp.virtual_pipeline_model_parallel_size == 2


@pytest.mark.slow
def test_every_layout_reads_back_the_same_full_tensors(saved):
    """Our reader maps stage-local numbers back to global ones: all three saves give the same
    full tensors by global name (the init does not depend on layout or padding past row 127)."""
    roots, _ = saved
    full = {n: ckpt.load_full_state(r) for n, r in roots.items()}
    tied_copy = {"output_layer.weight"}  # the last stage's copy of the embedding, at pp > 1 only
    assert len(full["tp1"]) == 4 * 12 + 4
    for other in ("tp2pp2", "tp1pp2vpp2"):
        assert set(full[other]) == set(full["tp1"]) | tied_copy
        for name, t in full["tp1"].items():
            assert torch.equal(full[other][name][:VOCAB], t[:VOCAB]), (other, name)


@pytest.mark.slow
def test_a_file_in_the_previous_layout_still_loads(saved, tmp_path):
    """Version 1: `model` a list of chunk dicts with global names, our optimizer and RNG states
    under `optimizer` and `rng_state`, no `args`; rewritten from the vpp save, it reads the same."""
    roots, _ = saved
    src = roots["tp1pp2vpp2"]
    old = tmp_path / "old"
    for pp_rank in range(2):
        name = ckpt.mp_rank_name(0, pp_rank, 2)
        new = _load_with_namespace_only(os.path.join(src, "iter_0000007", name, ckpt.MODEL_FILE))
        chunks = []
        for c in range(2):
            offset = (c * 2 + pp_rank) * 1
            chunks.append(
                {
                    _shift(k, offset): v
                    for k, v in new[f"model{c}"].items()
                    if not k.endswith("._extra_state")
                }
            )
        v1 = {k: v for k, v in new.items() if k not in ("model0", "model1", "args")}
        v1.pop("checkpoint_version")
        v1.update(format_version=1, model=chunks, optimizer=v1.pop(OPTIMIZER_KEY))
        v1["rng_state"] = v1.pop(RNG_KEY)
        os.makedirs(old / "iter_0000007" / name)
        torch.save(v1, old / "iter_0000007" / name / ckpt.MODEL_FILE)
    ckpt.write_latest(str(old), 7)
    a, b = ckpt.load_full_state(str(old)), ckpt.load_full_state(src)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def _shift(name: str, offset: int) -> str:
    if not name.startswith("decoder.layers."):
        return name
    _, _, i, rest = name.split(".", 3)
    return f"decoder.layers.{int(i) + offset}.{rest}"


@pytest.mark.slow
def test_reshard_writes_the_same_layout_as_training(saved, tmp_path):
    """convert.py's writer (reshard) is the training one: tp1 resharded to tp2 x pp2 gives files
    with the training save's model keys and shapes, `args` and `checkpoint_version`."""
    from megatron_lite.checkpointing.reshard import reshard

    roots, _ = saved
    out = str(tmp_path / "resharded")
    reshard(CheckpointReader(roots["tp1"]), out, 2, 2, log=lambda _: None)
    for spec in _specs(roots["tp2pp2"], 2, 2, 1):
        trained = _load_with_namespace_only(spec["path"])
        converted = _load_with_namespace_only(spec["path"].replace(roots["tp2pp2"], out))
        shapes = [
            {k: list(v.shape) if torch.is_tensor(v) else v for k, v in s["model"].items()}
            for s in (trained, converted)
        ]
        assert shapes[0] == shapes[1], spec["path"]
        assert converted["checkpoint_version"] == 3.0
        for f in MEGATRON_READS:
            assert getattr(converted["args"], f) == getattr(trained["args"], f), f


# Megatron-LM's check_checkpoint_args (checkpoint version 3.0): field -> value its argparse gives a
# run of that model (add_position_embedding: True unless --no-position-embedding, which no Llama
# script passes; padded_vocab_size and tp / pp compared only for --ckpt-format torch)
def _megatron_expects(tp: int, pp: int, fmt: str) -> dict:
    rules = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                 add_position_embedding=True, max_position_embeddings=SEQ,
                 make_vocab_size_divisible_by=128, tokenizer_type="NullTokenizer")  # fmt: skip
    if fmt == "torch":
        rules.update(padded_vocab_size=PADDED[tp], tensor_model_parallel_size=tp,
                     pipeline_model_parallel_size=pp)  # fmt: skip
    return rules


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_args_pass_megatron_lms_checks_with_its_llama_flags(flavour, tp, pp, fmt):
    """A Llama run (rope, swiglu, RMSNorm, GQA, untied) gets add_position_embedding True, as
    Megatron-LM's own run with --position-embedding-type rope has it; every compared field too."""
    from megatron_lite.checkpointing.save import _plain_entries
    from megatron_lite.checkpointing.torch_format import megatron_args

    cfg = _cfg(tp, pp, None, tp * pp)
    if flavour == "llama":
        cfg.model.position_embedding_type, cfg.model.swiglu = "rope", True
        cfg.model.normalization, cfg.model.num_query_groups = "RMSNorm", 2
        cfg.model.untie_embeddings_and_output_weights = True
    ps = argparse.Namespace(tp_size=tp, pp_size=pp, dp_size=1, ep_size=1)
    args = megatron_args(_plain_entries(7, [None], None, cfg, ps, 56, {}, VOCAB), fmt)
    got = {k: getattr(args, k) for k in _megatron_expects(tp, pp, fmt)}
    assert got == _megatron_expects(tp, pp, fmt)
    assert args.ckpt_format == fmt and args.consumed_train_samples == 56
