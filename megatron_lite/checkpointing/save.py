"""Save: every rank's part of the model, optimizer, schedule and RNG, written atomically."""

from __future__ import annotations

import glob
import os
import re
import shutil
from typing import Any

import torch

from megatron_lite.checkpointing.async_save import finalize_async_save
from megatron_lite.checkpointing.experts import gather_experts
from megatron_lite.checkpointing.files import (
    FORMAT_VERSION,
    MODEL_FILE,
    agree_written,
    barrier,
    chunk_tensors,
    fsync_dir,
    iteration_dir,
    mp_rank_name,
    pause_for_test,
    plain,
    read_latest_iteration,
    shard_info_of,
    tensor_bytes,
    write_durably,
    write_latest,
)
from megatron_lite.checkpointing.rng import gather_rng_states
from megatron_lite.checkpointing.torch_format import CHECKPOINT_VERSION, megatron_args, to_file
from megatron_lite.config import Config
from megatron_lite.parallel_state import ParallelState

_ITER_DIR = re.compile(r"iter_(\d{7})")


def _model_state(chunks: list[torch.nn.Module], ps: ParallelState) -> tuple[list[dict], dict]:
    """Every chunk's tensors and their shard info, with the other ep ranks' experts (collective)."""
    tensors = [chunk_tensors(chunk) for chunk in chunks]
    info = [{n: shard_info_of(t, ps.tp_rank, ps.tp_size) for n, t in d.items()} for d in tensors]
    tensors, info = gather_experts(tensors, ps), gather_experts(info, ps)
    models = [plain(dict(d), f"model chunk {i}") for i, d in enumerate(tensors)]
    return models, {n: v for d in info for n, v in d.items()}


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    opt_param_scheduler: Any,
    cfg: Config,
    ps: ParallelState,
    consumed_samples: int,
    extra: dict | None = None,
    *,
    vocab_size: int | None = None,
) -> str:
    """Save on every rank (collective); returns the iteration directory.

    `vocab_size` is the true (unpadded) vocabulary, recorded so that a layout with another padding
    can load the embedding; it defaults to `cfg.data.vocab_size`. `extra`: plain data to keep.
    """
    ck = cfg.checkpoint
    finalize_async_save()  # the previous (async) save is published before this one starts
    in_flight = sum(getattr(c, "params_in_flight", lambda: 0)() for c in model_chunks)
    if in_flight:  # a save reads parameters outside a forward: the step must have landed them
        raise RuntimeError(
            f"save_checkpoint: {in_flight} parameter all-gathers still in flight "
            "(--overlap-param-gather); call distributed.finish_param_gather(model) first"
        )
    if ck.ckpt_format == "torch_dist":
        return _save_torch_dist(
            save_dir, iteration, model_chunks, optimizer, opt_param_scheduler, cfg, ps,
            consumed_samples, extra, vocab_size,
        )  # fmt: skip
    # Collectives first, on every rank: the distributed optimizer gathers its dp shards, RNG states
    # go to dp rank 0.
    optim = None
    if optimizer is not None and not ck.no_save_optim:
        optim = {
            "param_state": gather_experts([optimizer.per_param_state_dict()], ps)[0],
            "state_dict": optimizer.state_dict(),
        }
    rng = gather_rng_states(ps) if not ck.no_save_rng else None
    models, shard_info = _model_state(model_chunks, ps)

    final = iteration_dir(save_dir, iteration)
    tmp = final + ".tmp"
    if ps.rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        os.makedirs(tmp)
    barrier()
    error, needed = None, 0
    if ps.dp_rank == 0 and ps.cp_rank == 0:  # cp ranks hold the same model: one of them writes
        state = _plain_entries(
            iteration, model_chunks, opt_param_scheduler, cfg, ps, consumed_samples, extra,
            vocab_size,
        )  # fmt: skip
        state.update(shard_info=shard_info, optimizer=plain(optim, "optimizer"), rng_state=rng)
        state = to_file(state, models, ps.pp_rank)  # Megatron-LM's layout (torch_format.py)
        needed = tensor_bytes(state)
        d = os.path.join(tmp, mp_rank_name(ps.tp_rank, ps.pp_rank, ps.pp_size))
        try:
            os.makedirs(d)
            write_durably(os.path.join(d, MODEL_FILE), lambda f: torch.save(state, f))
            fsync_dir(d)
        except (OSError, RuntimeError) as e:  # a full disk: torch's writer says "unexpected pos"
            error = e
    agree_written(error, tmp, f"iteration {iteration} to {save_dir}", needed)
    if ps.rank == 0:
        _publish(save_dir, iteration, ck.save_retain)
    barrier()
    return final


def _plain_entries(
    iteration, model_chunks, opt_param_scheduler, cfg, ps, consumed_samples, extra, vocab_size
) -> dict:
    """What both formats keep besides tensors: the run's position, config, layout and schedule."""
    return {
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "consumed_samples": int(consumed_samples),
        "config": _saved_config(cfg),
        "layout": {
            "tp": ps.tp_size,
            "pp": ps.pp_size,
            "dp": ps.dp_size,
            "ep": ps.ep_size,
            "vpp": len(model_chunks) if len(model_chunks) > 1 else None,
            "use_distributed_optimizer": cfg.parallel.use_distributed_optimizer,
        },
        "vocab_size": vocab_size if vocab_size is not None else cfg.data.vocab_size,
        "opt_param_scheduler": plain(
            opt_param_scheduler.state_dict() if opt_param_scheduler is not None else None,
            "opt_param_scheduler",
        ),
        "extra": plain(extra, "extra"),
    }


def _save_torch_dist(
    save_dir, iteration, model_chunks, optimizer, opt_param_scheduler, cfg, ps,
    consumed_samples, extra, vocab_size,
) -> str:  # fmt: skip
    """--ckpt-format torch_dist (see dist.py): every rank writes its own chunks, no gathers."""
    ck = cfg.checkpoint
    save_optim = optimizer is not None and not ck.no_save_optim
    common = _plain_entries(
        iteration, model_chunks, opt_param_scheduler, cfg, ps, consumed_samples, extra, vocab_size
    )
    common.update(
        optimizer={"state_dict": plain(optimizer.state_dict(), "optimizer")}
        if save_optim
        else None,
        has_rng=not ck.no_save_rng,
    )
    # what Megatron-LM's torch_dist loader reads from common.pt (its loop writes them there)
    common.update(
        args=megatron_args(common, "torch_dist"),
        checkpoint_version=CHECKPOINT_VERSION,
        num_floating_point_operations_so_far=0,
    )
    from megatron_lite.checkpointing.dist import save_dist  # DCP: imported only when used

    return save_dist(
        save_dir,
        iteration,
        model_chunks,
        optimizer,
        common,
        ps,
        save_optim=save_optim,
        save_rng=not ck.no_save_rng,
        async_save=ck.async_save,
        publish=lambda: _publish(save_dir, iteration, ck.save_retain) if ps.rank == 0 else None,
    )


def _publish(save_dir: str, iteration: int, save_retain: int | None) -> None:
    """Rank 0, once every file is written: rename the temporary directory into place, then name
    it in the latest file, then tidy (killed saves' leftovers, --save-retain)."""
    final = iteration_dir(save_dir, iteration)
    tmp = final + ".tmp"
    fsync_dir(tmp)
    pause_for_test("before_rename", save_dir)
    old = final + ".old"
    if os.path.exists(final):  # saving the same iteration again: keep the old one until renamed
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(save_dir)
    shutil.rmtree(old, ignore_errors=True)
    pause_for_test("before_latest", save_dir)
    write_latest(save_dir, iteration)
    for stale in glob.glob(os.path.join(save_dir, "iter_*.tmp")):  # from saves that were killed
        shutil.rmtree(stale, ignore_errors=True)
    if save_retain not in (None, -1):
        retain_checkpoints(save_dir, save_retain)


def retain_checkpoints(save_dir: str, keep: int) -> list[int]:
    """--save-retain: delete all but the `keep` highest `iter_XXXXXXX` directories of `save_dir`,
    never the one the latest file names; returns the deleted iterations. The latest file is
    written before this runs, so a job killed while deleting still resumes from a whole checkpoint."""
    latest = read_latest_iteration(save_dir)
    found = sorted(
        int(m.group(1))
        for name in os.listdir(save_dir)
        if (m := _ITER_DIR.fullmatch(name)) and os.path.isdir(os.path.join(save_dir, name))
    )
    doomed = [it for it in found[: max(len(found) - keep, 0)] if it != latest]
    for it in doomed:
        shutil.rmtree(iteration_dir(save_dir, it))
    if doomed:
        fsync_dir(save_dir)
    return doomed


def _saved_config(cfg: Config) -> dict:
    """The config as stored: tokenizer files as absolute paths, so that generate.py, convert.py
    and --use-checkpoint-args find them from any working directory."""
    d = cfg.to_dict()
    data = d["data"]
    for key in ("vocab_file", "merge_file", "tokenizer_model"):
        path = data.get(key)
        if isinstance(path, str) and os.path.exists(path):  # not a hub name
            data[key] = os.path.abspath(path)
    return d
