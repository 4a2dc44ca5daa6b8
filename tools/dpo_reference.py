"""Log-probabilities of the responses of DPO pairs under a checkpoint: the frozen reference of --dpo.

    python tools/preprocess_sft_data.py --task dpo --input pairs.jsonl --output-prefix data/pairs ...
    python tools/dpo_reference.py --load checkpoints/sft --data-path data/pairs_dpo_document
        # -> data/pairs_dpo_document_reference.npy ([pairs, 2]: chosen, rejected) + .json
    torchrun ... -m megatron_lite.pretrain_gpt --dpo --data-path data/pairs_dpo_document \\
        --load checkpoints/sft --finetune --save checkpoints/dpo ...

Run it once with the checkpoint DPO starts from (the reference stays that model for the whole run,
resumes included). Each sequence is cut to --seq-length + 1 tokens (default: the checkpoint's), as
training cuts it. One process; --output writes the log-probabilities elsewhere (to compare
checkpoints on held-out pairs, say) and --print-margin prints the mean chosen-minus-rejected
log-probability margin and how often it is positive.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_lite.cli import run_main  # noqa: E402
from megatron_lite.data.dpo_dataset import data_digest, pair_rows, reference_paths  # noqa: E402
from megatron_lite.data.sft_dataset import MaskedDataset  # noqa: E402
from megatron_lite.errors import UserError  # noqa: E402
from megatron_lite.inference.generation import LanguageModel, load_model  # noqa: E402
from megatron_lite.tensor_parallel.cross_entropy import token_log_probs  # noqa: E402
from megatron_lite.training.dpo import sequence_logps  # noqa: E402


@torch.no_grad()
def pair_logps(lm: LanguageModel, data: MaskedDataset, seq_length: int, batch: int) -> np.ndarray:
    """[pairs, 2] log-probabilities of each pair's chosen and rejected response."""
    pad = 0  # right padding never reaches a masked token's logits (causal): any id does
    out = []
    for lo in range(0, len(data), batch):
        seqs = [s for d in range(lo, min(lo + batch, len(data))) for s in data[d]]
        rows = pair_rows(seqs, seq_length, pad)
        logits = lm.logits(rows["tokens"]).float()  # [r, s, vocab]
        per_token = -token_log_probs(logits, rows["labels"])  # the loss
        out.append(sequence_logps(per_token, rows["loss_mask"]).view(-1, 2).numpy())
    return np.concatenate(out) if out else np.zeros((0, 2))


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True, help="The checkpoint DPO starts from.")
    p.add_argument("--iteration", type=int, help="Checkpoint iteration (default: the latest).")
    p.add_argument(
        "--data-path", required=True, help="Pairs from preprocess_sft_data.py --task dpo"
    )
    p.add_argument("--seq-length", type=int, help="Training --seq-length (default: checkpoint's)")
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=16, help="Pairs per forward pass")
    p.add_argument("--output", help="Write here instead of beside the data ({data}_reference.npy)")
    p.add_argument("--print-margin", action="store_true", help="Print the mean margin")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("tools/dpo_reference.py runs as one process (not under torchrun)")
    data = MaskedDataset(args.data_path)
    lm = load_model(args.load, dtype=args.dtype, iteration=args.iteration)
    seq_length = args.seq_length or lm.cfg.model.seq_length
    logps = pair_logps(lm, data, seq_length, args.batch_size)
    npy, meta = reference_paths(args.data_path)
    if args.output:
        npy, meta = args.output, os.path.splitext(args.output)[0] + ".json"
    np.save(npy, logps)
    with open(meta, "w", encoding="utf-8") as f:
        info = {"load": os.path.realpath(args.load), "iteration": args.iteration}
        info.update(seq_length=seq_length, data_digest=data_digest(args.data_path))
        json.dump(info, f)
    margin = logps[:, 0] - logps[:, 1]
    print(f"wrote {npy}: {len(logps)} pairs, seq_length {seq_length}")
    if args.print_margin:
        print(f"margin {margin.mean():.6f} positive {(margin > 0).mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
