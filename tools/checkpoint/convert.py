"""Convert checkpoints: reshard megatron_lite checkpoints, export to / import from Hugging Face.

    # any tp x pp -> any tp x pp (optimizer state kept; resume with --load)
    python tools/checkpoint/convert.py --load-dir ckpt --save-dir ckpt_tp1 \
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1
    # to / from torch.distributed.checkpoint (--ckpt-format torch_dist); the source format is detected
    python tools/checkpoint/convert.py --load-dir ckpt --save-dir ckpt_dist --ckpt-format torch_dist
    # to transformers (GPT-2 flavour -> GPT2LMHeadModel, Llama flavour -> LlamaForCausalLM)
    python tools/checkpoint/convert.py --saver hf --load-dir ckpt --save-dir hf_model --check
    # from transformers, at tp=2 pp=2 (continue with --load hf_import --finetune)
    python tools/checkpoint/convert.py --loader hf --load-dir hf_model --save-dir hf_import \
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

Streams: one full tensor (export) or one target file (reshard/import) in memory at a time, source
files memory-mapped. `--check` then loads source and target whole (tp = 1, one process) and
compares their logits on a few token sequences; the exit code is 1 when they differ by more than
`--check-tolerance`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_lite.checkpointing import CheckpointError, CheckpointReader  # noqa: E402
from megatron_lite.checkpointing.hf_export import export_hf  # noqa: E402
from megatron_lite.checkpointing.hf_reader import DTYPES, HFReader, parse_dtype  # noqa: E402
from megatron_lite.checkpointing.hf_rules import model_flags  # noqa: E402
from megatron_lite.checkpointing.megatron import MegatronReader, is_megatron_dir  # noqa: E402
from megatron_lite.checkpointing.reshard import check_logits, reshard  # noqa: E402
from megatron_lite.errors import UserError, UserFileNotFoundError  # noqa: E402

DEFAULT_TOLERANCE = {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.05}


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for u, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load-dir", required=True, help="Source checkpoint or HF model directory.")
    p.add_argument("--save-dir", required=True, help="Where the converted checkpoint goes.")
    p.add_argument(
        "--loader",
        choices=["megatron_lite", "hf", "megatron", "mcore"],
        default="megatron_lite",
        help="Source format: ours, a HF directory, or Megatron-LM's legacy torch checkpoint "
        "(megatron and mcore: the same files; megatron_lite also recognises them).",
    )
    p.add_argument("--saver", choices=["megatron_lite", "hf"], default="megatron_lite")
    p.add_argument(
        "--ckpt-format",
        choices=["torch", "torch_dist"],
        default="torch",
        help="Saver megatron_lite: write per-(tp, pp) torch files or one torch_dist (DCP) "
        "checkpoint. The source's format is detected.",
    )
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--iteration", type=int, help="Source iteration (default: the latest).")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="Cast weights (default: as saved).")
    p.add_argument(
        "--no-optimizer",
        action="store_true",
        help="Reshard weights only (then load with --finetune or --no-load-optim).",
    )
    p.add_argument(
        "--max-shard-size", type=_size, default="5GB", help="HF export: largest safetensors file."
    )
    p.add_argument("--check", action="store_true", help="Compare source and target logits.")
    p.add_argument("--check-tolerance", type=float, help="Largest allowed |logit difference|.")
    return p


def _open_source(args):
    if not os.path.isdir(args.load_dir):
        raise UserFileNotFoundError(f"--load-dir {args.load_dir}: no such directory")
    if args.loader == "hf":
        if not os.path.isfile(os.path.join(args.load_dir, "config.json")):
            raise CheckpointError(f"--loader hf: {args.load_dir} has no config.json")
        return HFReader(args.load_dir)
    from megatron_lite.checkpointing.dist_read import open_dist_checkpoint

    dist = open_dist_checkpoint(args.load_dir, args.iteration)  # ours or megatron-core's
    if dist is not None:
        return dist
    if args.loader in ("megatron", "mcore") or is_megatron_dir(args.load_dir, args.iteration):
        return MegatronReader(args.load_dir, args.iteration)
    return CheckpointReader(args.load_dir, args.iteration)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = parse_dtype(args.dtype)
    start = time.perf_counter()
    try:
        reader = _open_source(args)
        if args.saver == "hf":
            export_hf(reader, args.save_dir, dtype, args.max_shard_size)
        else:
            reshard(
                reader,
                args.save_dir,
                args.target_tensor_parallel_size,
                args.target_pipeline_parallel_size,
                dtype=dtype,
                keep_optimizer=not args.no_optimizer,
                ckpt_format=args.ckpt_format,
            )
            if args.loader == "hf":
                print(
                    f"train on with: {model_flags(reader.config['model'], reader.config.get('moe'))} --finetune"
                )
    except (UserError, ValueError, FileNotFoundError) as e:  # bad flags, files, checkpoints
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted in {time.perf_counter() - start:.1f} s")
    if args.check:
        short = {v: k for k, v in DTYPES.items() if len(k) == 4}.get(dtype, "fp32")
        tol = args.check_tolerance or DEFAULT_TOLERANCE[short]
        source_iteration = args.iteration if args.loader != "hf" else None
        diff = check_logits(args.load_dir, args.save_dir, source_iteration=source_iteration)
        if diff > tol:
            print(f"check FAILED: max abs logit diff {diff:.3e} > tolerance {tol:g}")
            return 1
        print(f"check passed: max abs logit diff {diff:.3e} <= tolerance {tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
