"""Offline checkpoint conversion, the library behind tools/checkpoint/convert.py.

- `reshard`: a megatron_lite checkpoint (any tp x pp x vpp) or a Hugging Face model directory ->
  a megatron_lite checkpoint at any tp x pp, written one target file (one tp rank of one stage) at
  a time. Each target shard comes from `checkpointing.shard_from_reader`, the function the online
  loader uses, so `--load` of the result gives exactly what `--load` of the source would have.
- `check_logits`: run source and target on a few token sequences and report the largest logit
  difference (a HF directory is run by `transformers` itself when it is installed).
Export to HF format is `hf_export.export_hf`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Callable

import torch

from megatron_lite import checkpointing as ckpt
from megatron_lite.checkpointing.hf_reader import is_hf_dir, open_checkpoint, training_dtype
from megatron_lite.checkpointing.hf_rules import WORD_EMBEDDING, dtype_name
from megatron_lite.checkpointing.torch_format import to_file
from megatron_lite.config import Config
from megatron_lite.model.gpt import build_meta_chunk
from megatron_lite.tensor_parallel.utils import tags_of

_TAGS = (
    "tensor_model_parallel",
    "partition_dim",
    "partition_stride",
    "sequence_parallel",
    "shared_embedding",
    "init_name",
)


def target_config(config: dict, tp: int, pp: int, dtype: torch.dtype | None) -> Config:
    """The source config at tp x pp (no virtual stages); validated, so a bad layout says why."""
    d = copy.deepcopy(config)
    d["parallel"].update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_layers_per_virtual_pipeline_stage=None,
    )
    if dtype is not None:  # the saved config says which dtype the model tensors are in
        d["optim"].update(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    for k in ("world_size", "data_parallel_size", "num_microbatches"):
        d[k] = None
    return Config.from_dict(d)


def stage_skeleton(cfg: Config, pp_rank: int, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Stage `pp_rank`'s tensors at full (tp = 1) shape with their tags, on the meta device: the
    names, shapes and shard tags the target layout has, without allocating anything."""
    return build_meta_chunk(cfg, pp_rank, padded_vocab).state_dict(keep_vars=True)


def shard_like(full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """A meta tensor shaped and tagged like tp rank `tp_rank`'s shard of `full`."""
    tags = tags_of(full)
    dim = tags.partition_dim if tags.tensor_model_parallel else -1
    shard = ckpt.slice_shard(full, dim, tags.partition_stride, tp_rank, tp_size)
    if shard is not full:
        for tag in _TAGS:
            if hasattr(full, tag):
                setattr(shard, tag, getattr(full, tag))
    return shard


def _rank_state(reader, skeleton, tp_rank, cfg, dtype, keep_optim, src_file) -> dict:
    tp = cfg.parallel.tensor_model_parallel_size
    model, shard_info, param_state = {}, {}, {}
    for name, full in skeleton.items():
        like = shard_like(full, tp_rank, tp)
        src = ckpt.source_name(reader, name, like)
        key = ckpt.weight_key(reader, src)
        w = ckpt.shard_from_reader(reader, src, like, tp_rank, tp, key)
        model[name] = w.to(dtype or (training_dtype(reader.config) if key else w.dtype))
        shard_info[name] = ckpt.shard_info_of(like, tp_rank, tp)
        keys = reader.optimizer_state_keys(src) if keep_optim else []
        if keys:
            param_state[name] = {
                k: ckpt.shard_from_reader(reader, src, like, tp_rank, tp, k) for k in keys
            }
    optimizer = None
    if keep_optim:
        optimizer = {"param_state": param_state, "state_dict": src_file["optimizer"]["state_dict"]}
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "iteration": reader.iteration,
        "consumed_samples": reader.consumed_samples,
        "config": cfg.to_dict(),
        "layout": {
            "tp": tp,
            "pp": cfg.parallel.pipeline_model_parallel_size,
            "dp": 1,
            "vpp": None,
            "use_distributed_optimizer": False,
        },
        "vocab_size": reader.vocab_size,
        "model": [model],
        "shard_info": shard_info,
        "optimizer": optimizer,
        "opt_param_scheduler": src_file["opt_param_scheduler"],
        "rng_state": None,  # RNG streams are per rank: a new layout starts from the seed
        "extra": src_file["extra"],
    }


def _dist_chunks(state: dict, out: dict, tp_rank: int) -> None:
    """One target rank's state (`_rank_state`) as torch_dist chunks at their global offsets."""
    from megatron_lite.checkpointing.dist import add_chunks

    optim = state["optimizer"]["param_state"] if state["optimizer"] else {}
    for name, t in state["model"][0].items():
        info = state["shard_info"][name]
        if info["partition_dim"] < 0 and tp_rank != 0:
            continue
        add_chunks(out, f"model/{name}", t, info)
        for key, v in optim.get(name, {}).items():
            add_chunks(out, f"optim/{name}/{key}", v, info)


def _write_dist(tmp: str, chunks: dict, state: dict) -> None:
    from megatron_lite.checkpointing.dist import write_dist

    common = {k: v for k, v in state.items() if k not in ("model", "shard_info", "rng_state")}
    if common["optimizer"] is not None:
        common["optimizer"] = {"state_dict": common["optimizer"]["state_dict"]}
    common["has_rng"] = False
    write_dist(tmp, chunks, ckpt.plain(common, "converted checkpoint"), None, "", no_dist=True)


def _write_file(d: str, state: dict) -> None:
    os.makedirs(d, exist_ok=True)
    ckpt.write_durably(os.path.join(d, ckpt.MODEL_FILE), lambda f: torch.save(state, f))
    ckpt.fsync_dir(d)


def reshard(
    reader,
    save_dir: str,
    tp: int,
    pp: int,
    *,
    dtype: torch.dtype | None = None,
    keep_optimizer: bool = True,
    ckpt_format: str = "torch",
    log: Callable[[str], None] = print,
) -> str:
    """Write `reader`'s checkpoint as a megatron_lite checkpoint at tp x pp; returns its directory.

    Optimizer state (Adam moments, fp32 masters) and the LR schedule are kept when the source has
    them (resume with plain `--load`); a HF model has none (load it with `--finetune`, or
    `--no-load-optim`). RNG states are not kept. Atomic like save_checkpoint: files go to
    `iter_XXXXXXX.tmp`, fsynced, renamed, and the latest-iteration file is written last.
    `ckpt_format` "torch_dist": one DCP checkpoint holding the target ranks' chunks (built in
    memory, then written by this one process).
    """
    if os.path.realpath(save_dir) == os.path.realpath(reader.dir.rsplit("/iter_", 1)[0]):
        raise ckpt.CheckpointError(f"--save-dir {save_dir} is the source directory")
    cfg = target_config(reader.config, tp, pp, dtype)
    vocab = reader.vocab_size or reader.full_tensor(WORD_EMBEDDING).shape[0]
    padded = cfg.padded_vocab_size(vocab)
    keep_optim = keep_optimizer and reader.has_optimizer()
    final = ckpt.iteration_dir(save_dir, reader.iteration)
    if os.path.exists(final):
        raise ckpt.CheckpointError(f"{final} exists already: choose an empty --save-dir")
    tmp, new_dir = final + ".tmp", not os.path.exists(save_dir)
    os.makedirs(tmp, exist_ok=True)
    chunks: dict = {}
    try:
        for pp_rank in range(pp):
            skeleton = stage_skeleton(cfg, pp_rank, padded)
            src_file = reader.file(0, min(pp_rank, reader.pp - 1))
            for tp_rank in range(tp):
                state = _rank_state(reader, skeleton, tp_rank, cfg, dtype, keep_optim, src_file)
                if ckpt_format == "torch_dist":
                    _dist_chunks(state, chunks, tp_rank)
                    plain_part = state  # the plain entries are the same in every target file
                    continue
                d = os.path.join(tmp, ckpt.mp_rank_name(tp_rank, pp_rank, pp))
                state = ckpt.plain(state, "converted checkpoint")
                _write_file(d, to_file(state, state["model"], pp_rank))
                log(f"  wrote {os.path.relpath(d, save_dir)} ({len(state['shard_info'])} tensors)")
                del state
        if ckpt_format == "torch_dist":
            _write_dist(tmp, chunks, plain_part)
            log(f"  wrote {len(chunks)} tensors as torch_dist ({tp} x {pp} ranks' chunks)")
    except BaseException:  # a corrupt source file, say: leave no half-written target behind
        shutil.rmtree(tmp, ignore_errors=True)
        if new_dir:
            with contextlib.suppress(OSError):
                os.rmdir(save_dir)
        raise
    ckpt.fsync_dir(tmp)
    os.rename(tmp, final)
    ckpt.fsync_dir(save_dir)
    ckpt.write_latest(save_dir, reader.iteration)
    what = "with optimizer state" if keep_optim else "weights only (load with --finetune)"
    log(f"saved iteration {reader.iteration} at tp={tp} pp={pp}, {what}, to {save_dir}")
    return final


# ---------------------------------------------------------------------------------------------------
# --check


def probe_tokens(vocab_size: int, max_len: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    """A few fixed random token sequences [n, s] to compare models on."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, min(16, max_len)), generator=g)


def _transformers_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float().cpu()


def logits_of(path: str, tokens: torch.Tensor, iteration: int | None = None) -> torch.Tensor:
    """fp32 logits [b, s, vocab] of a checkpoint (a HF directory runs in transformers if present)."""
    if is_hf_dir(path):
        try:
            return _transformers_logits(path, tokens)
        except ImportError:
            pass  # no transformers: our model on the HF weights
    from megatron_lite.inference.generation import load_model

    lm = load_model(path, dtype=torch.float32, iteration=iteration)
    return lm.logits(tokens).float().cpu()


def check_logits(
    source: str,
    target: str,
    *,
    source_iteration: int | None = None,
    log: Callable[[str], None] = print,
) -> float:
    """Largest |logit difference| between two checkpoints on a few token sequences."""
    reader = open_checkpoint(source, source_iteration)
    m = reader.config["model"]
    vocab = reader.vocab_size or reader.full_tensor(WORD_EMBEDDING).shape[0]
    tokens = probe_tokens(vocab, m["max_position_embeddings"])
    a = logits_of(source, tokens, source_iteration)[..., :vocab]
    b = logits_of(target, tokens)[..., :vocab]
    diff = (a - b).abs().max().item()
    log(
        f"check: logits of {tuple(tokens.shape)} tokens, max abs diff {diff:.3e} "
        f"(max |logit| {a.abs().max().item():.3g}; target dtype {dtype_name(b.dtype)})"
    )
    return diff
