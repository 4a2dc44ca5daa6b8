"""Fit L(N, D) = E + A/N^alpha + B/D^beta to a sweep (Hoffmann et al. 2022, approach 3) and plan a
run: the compute-optimal N and D for a FLOP budget, a model shape of that size, and the
`tools/estimate.py --search` command that lays it out on the cluster.

    bash examples/scaling_sweep.sh                       # a small CPU sweep -> sweep_out/runs/h*
    python tools/scaling_laws.py --runs sweep_out/runs/h* --budget-flops 1e21 \\
        --seq-length 2048 --global-batch-size 512 --world-size 64 --gpu-memory-gb 80

Each run directory holds args.txt (its pretrain_gpt flags) and train.log and/or TensorBoard files
(megatron_lite/estimate/sweep.py); `--losses FILE.csv` (N,D,loss rows) takes points from anywhere.
`--hold-out RUN` leaves a run out of the fit and reports how well the law predicts it.
`--flops exact` spends the budget with our exact FLOPs per token (attention and the output layer
included) over a family of shapes instead of C = 6ND. `--run-estimate` runs the estimate as well.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see scaling_laws.fit
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.config import Config  # noqa: E402
from megatron_lite.estimate.scaling_laws import ScalingLaw, best_shape, fit  # noqa: E402
from megatron_lite.estimate.sweep import Run, non_embedding_params, read_run, vocab_size  # noqa: E402
from megatron_lite.model.flops import model_flops_per_token  # noqa: E402

LAYERS = (2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 56, 64, 80, 96, 128)
HEAD_DIM = 64


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("the sweep")
    g.add_argument("--runs", nargs="*", default=[], help="run directories (args.txt + losses)")
    g.add_argument("--losses", help="CSV of N,D,loss points (header optional)")
    g.add_argument("--split", choices=["validation", "train"], default="validation")
    g.add_argument("--source", choices=["auto", "log", "tensorboard"], default="auto")
    g.add_argument("--min-iteration", type=int, default=1, help="skip earlier points (warm-up)")
    g.add_argument("--hold-out", nargs="*", default=[], help="run names left out of the fit")
    g = p.add_argument_group("the plan")
    g.add_argument("--budget-flops", type=float, help="training FLOPs to spend")
    g.add_argument("--flops", choices=["6nd", "exact"], default="6nd", help="C = 6ND or exact")
    g.add_argument("--seq-length", type=int, help="of the planned run (default: the sweep's)")
    g.add_argument("--global-batch-size", type=int, help="of the planned run (default 512)")
    g.add_argument("--world-size", type=int, default=8, help="GPUs for estimate.py --search")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0, help="for estimate.py")
    g.add_argument("--run-estimate", action="store_true", help="run tools/estimate.py too")
    g.add_argument("--json", help="write the fitted law and the plan here")
    return p


def load_points(args, p) -> tuple[list[Run], list[tuple], dict[str, list[tuple]]]:
    """(runs, points to fit, held-out run name -> its points)."""
    runs, points, held = [], [], {}
    for d in args.runs:
        try:
            run = read_run(d, args.split, args.source)
        except (OSError, ValueError) as e:
            p.error(str(e))
        runs.append(run)
        pts = run.points(args.min_iteration)
        (held.setdefault(run.name, []) if run.name in args.hold_out else points).extend(pts)
    missing = set(args.hold_out) - {r.name for r in runs}
    if missing:
        p.error(f"--hold-out {sorted(missing)}: not among the --runs ({[r.name for r in runs]})")
    if args.losses:
        points.extend(read_losses_csv(args.losses, p))
    if len(points) < 5:
        p.error(f"{len(points)} points to fit: 5 parameters need at least 5 (--runs, --losses)")
    return runs, points, held


def read_losses_csv(path: str, p) -> list[tuple[float, float, float]]:
    """N,D,loss rows of `path` (further columns ignored); the first row may be a header, any other
    row must start with three numbers."""
    out = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if not row or all(not x.strip() for x in row):
                    continue
                try:
                    if len(row) < 3:
                        raise ValueError
                    out.append(tuple(float(x) for x in row[:3]))
                except ValueError:
                    if line == 1:
                        continue  # a header
                    p.error(f"--losses {path}:{line}: {','.join(row)!r}: expected N,D,loss numbers")
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"--losses {path}: {e}")
    return out


def shape_config(ref: Config, layers: int, hidden: int) -> Config:
    heads = max(hidden // HEAD_DIM, 1)
    model = dataclasses.replace(
        ref.model,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        ffn_hidden_size=None,
        kv_channels=None,
    )
    return dataclasses.replace(ref, model=model)


def shapes(ref: Config, n_max: float) -> list[Config]:
    """The family a plan picks from: hidden a multiple of 64, 16 <= hidden / layers <= 256."""
    out = []
    for layers in LAYERS:
        for hidden in range(HEAD_DIM, 65537, HEAD_DIM):
            if 16 * layers <= hidden <= 256 * layers and 12 * layers * hidden**2 <= 4 * n_max:
                out.append(shape_config(ref, layers, hidden))
    return out


def plan(law: ScalingLaw, args, ref: Config, vocab: int) -> dict:
    """The compute-optimal (N, D) and the shape that spends the budget best."""
    n_opt, d_opt = law.compute_optimal(args.budget_flops)
    family = shapes(ref, n_opt)
    if args.flops == "6nd":
        cfg = min(family, key=lambda c: abs(non_embedding_params(c) - n_opt))
        n, d = non_embedding_params(cfg), args.budget_flops / (6 * non_embedding_params(cfg))
        pred = float(law.loss(n, d))
    else:
        cfg, n, d, pred = best_shape(
            law,
            args.budget_flops,
            family,
            non_embedding_params,
            lambda c: model_flops_per_token(c, vocab),
        )
    return {"n_opt": n_opt, "d_opt": d_opt, "cfg": cfg, "n": n, "d": d, "loss": pred}


def estimate_flags(cfg: Config, d: float, args, vocab: int) -> list[str]:
    m = cfg.model
    seq = args.seq_length or m.seq_length
    gbs = args.global_batch_size or 512
    iters = max(1, round(d / (seq * gbs)))
    return [
        *("--num-layers", str(m.num_layers), "--hidden-size", str(m.hidden_size)),
        *("--num-attention-heads", str(m.num_attention_heads), "--seq-length", str(seq)),
        *("--max-position-embeddings", str(seq), "--micro-batch-size", "1"),
        *("--global-batch-size", str(gbs), "--train-iters", str(iters), "--bf16"),
        *("--vocab-size", str(vocab), "--world-size", str(args.world_size)),
        *("--gpu-memory-gb", f"{args.gpu_memory_gb:g}", "--search"),
    ]


def describe_fit(law: ScalingLaw, value: float, runs: list[Run], points, held) -> list[str]:
    lines = [f"{len(points)} points from {len(runs)} runs (N = non-embedding parameters):"]
    for r in runs:
        pts = r.points()
        tag = "  (held out)" if r.name in held else ""
        lines.append(
            f"  {r.name:12s} N {r.params:>12,}  {len(pts):3d} points, D {pts[0][1]:.3g}..{pts[-1][1]:.3g},"
            f" loss {pts[0][2]:.3f} -> {pts[-1][2]:.3f}{tag}"
        )
    rel = [abs(float(law.loss(n, d)) / loss - 1) for n, d, loss in points]
    lines += [
        f"fit (Hoffmann et al. 2022, approach 3, Huber delta 1e-3 on log loss): L(N, D) = "
        f"{law.E:.4g} + {law.A:.4g} / N^{law.alpha:.4f} + {law.B:.4g} / D^{law.beta:.4f}",
        f"  objective {value:.3e}; |relative error| on the fitted points: mean "
        f"{100 * sum(rel) / len(rel):.2f}%, max {100 * max(rel):.2f}%",
    ]
    for name, pts in held.items():
        n, d, loss = pts[-1]
        pred = float(law.loss(n, d))
        lines.append(
            f"held out {name}: N {n:,.0f}, D {d:,.0f}: predicted {pred:.4f}, measured {loss:.4f}, "
            f"error {100 * (pred / loss - 1):+.2f}%"
        )
    return lines


def describe_frontier(law: ScalingLaw, budget: float | None) -> list[str]:
    lines = [
        "compute-optimal frontier (C = 6ND):",
        "         C FLOPs          N_opt          D_opt   D/N   loss",
    ]
    centre = budget or 1e18
    for k in range(-2, 3):
        c = centre * 10.0**k
        n, d = law.compute_optimal(c)
        lines.append(f"  {c:14.3e} {n:14.4g} {d:14.4g} {d / n:5.1f} {float(law.loss(n, d)):6.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = get_parser()
    args = p.parse_args(argv)
    runs, points, held = load_points(args, p)
    try:
        law, value = fit(*zip(*points))
    except ValueError as e:
        p.error(str(e))
    print("\n".join(describe_fit(law, value, runs, points, held)))
    print("\n".join(describe_frontier(law, args.budget_flops)))
    out = {"law": law.to_dict(), "objective": value, "held_out": {}}
    for name, pts in held.items():
        n, d, loss = pts[-1]
        out["held_out"][name] = {
            "N": n,
            "D": d,
            "measured": loss,
            "predicted": float(law.loss(n, d)),
        }
    if args.budget_flops:
        if not runs:
            p.error("--budget-flops needs --runs (their flags describe the model family)")
        ref = runs[0].cfg
        if args.seq_length:
            m = dataclasses.replace(
                ref.model, seq_length=args.seq_length, max_position_embeddings=args.seq_length
            )
            ref = dataclasses.replace(ref, model=m)
        vocab = vocab_size(ref)
        best = plan(law, args, ref, vocab)
        m = best["cfg"].model
        flags = estimate_flags(best["cfg"], best["d"], args, vocab)
        print(
            f"budget {args.budget_flops:.3e} FLOPs: N_opt {best['n_opt']:,.0f}, D_opt "
            f"{best['d_opt']:,.0f} tokens (C = 6ND)\n  shape ({args.flops} FLOPs): {m.num_layers} "
            f"layers, hidden {m.hidden_size}, {m.num_attention_heads} heads: N {best['n']:,}, "
            f"D {best['d']:,.0f} tokens, predicted loss {best['loss']:.4f}\n"
            "  lay it out: python tools/estimate.py " + " ".join(flags)
        )
        out["plan"] = {k: v for k, v in best.items() if k != "cfg"}
        out["plan"]["estimate_flags"] = flags
        if args.run_estimate:
            from megatron_lite.estimate.cli import main as estimate_main

            print()
            estimate_main(flags)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
