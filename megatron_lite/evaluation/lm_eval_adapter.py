"""lm-evaluation-harness adapter: `megatron_lite` as an lm-eval model (needs `pip install lm-eval`).

    python -m megatron_lite.evaluation.lm_eval_adapter --model megatron_lite \
        --model_args load=CKPT[,dtype=fp32,batch_size=16,iteration=N] --tasks hellaswag ...
    lm_eval --model megatron_lite --model_args load=CKPT ...      # once `install-hook` ran

    import megatron_lite.evaluation.lm_eval_adapter  # registers it (lm_eval.api.registry)
    lm_eval.simple_evaluate(model="megatron_lite", model_args="load=CKPT", tasks=[...])

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so the plain
`lm_eval` command sees ours after `python -m megatron_lite.evaluation.lm_eval_adapter
install-hook` has put a one-line .pth file into site-packages that registers the name lazily
when lm-eval's registry is imported (`make test` runs it). The requests are answered by
`evaluation.requests.Scorer`, the code tools/evaluate.py uses; under torchrun the model is split
tp x pp (model_args tensor_model_parallel_size, pipeline_model_parallel_size) and the requests
over the dp replicas, so lm-eval itself runs as one process on every rank (world_size 1).
"""

from __future__ import annotations

import os
import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from megatron_lite.evaluation.requests import Scorer

NAME = "megatron_lite"
HOOK = "megatron_lite_lm_eval.pth"


def _parallel_state(tp, pp):
    from megatron_lite.parallel_state import ParallelState, init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ParallelState.single()
    init_distributed()
    pp = int(pp or 1)
    return ParallelState.build(tp=int(tp or world // pp), pp=pp)


class MegatronLiteLM(LM):
    """model_args: load (checkpoint or HF directory), iteration, dtype (auto|fp32|bf16|fp16),
    batch_size, tensor_model_parallel_size, pipeline_model_parallel_size, and the tokenizer
    overrides tokenizer_type, vocab_file, merge_file, tokenizer_model, vocab_size."""

    def __init__(
        self,
        load: str,
        iteration: int | None = None,
        dtype: str = "auto",
        batch_size: int | str = 8,
        tensor_model_parallel_size: int | None = None,
        pipeline_model_parallel_size: int = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        **tokenizer,
    ) -> None:
        super().__init__()
        from megatron_lite.inference.generation import build_generation_tokenizer, load_model

        known = {"tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size"}
        if set(tokenizer) - known:
            raise ValueError(f"unknown model_args {sorted(set(tokenizer) - known)}")
        ps = _parallel_state(tensor_model_parallel_size, pipeline_model_parallel_size)
        it = None if iteration is None else int(iteration)
        self.model = load_model(load, ps, dtype=dtype, iteration=it, data_parallel=True)
        tok = build_generation_tokenizer(self.model, **tokenizer)
        bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(self.model, tok, bs)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            kw = dict(r.args[1])
            if isinstance(kw.get("until"), str):
                kw["until"] = [kw["until"]]
            out.append((r.args[0], kw))
        return self.scorer.generate_until(out)


if __name__ != "__main__":  # run with -m, the importable module (below) is the one registered
    register_model(NAME)(MegatronLiteLM)


def install_hook(site_dir: str | None = None) -> str:
    """Write megatron_lite_lm_eval_hook.py and the .pth that imports it at start-up into
    `site_dir` (default: this environment's site-packages). The hook is self-contained (it
    imports nothing until lm-eval's registry loads, and registers a lazy name), so a Python
    without megatron_lite on its path is not disturbed."""
    import shutil
    import sysconfig

    site_dir = site_dir or sysconfig.get_paths()["purelib"]
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_hook.py")
    shutil.copyfile(here, os.path.join(site_dir, "megatron_lite_lm_eval_hook.py"))
    path = os.path.join(site_dir, HOOK)
    with open(path, "w") as f:
        f.write("import megatron_lite_lm_eval_hook\n")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install-hook"]:
        print(f"wrote {install_hook()}")
        return 0
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    # the module's own name, not __main__: the installed hook names it (a second class would clash)
    from megatron_lite.evaluation.lm_eval_adapter import main as _main

    sys.exit(_main())
