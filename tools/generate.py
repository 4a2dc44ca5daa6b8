"""Generate text from a checkpoint (megatron_lite, any layout, or a Hugging Face directory).

    python tools/generate.py --load ckpt --prompt "Once upon a time" --max-new-tokens 64 \
        --temperature 0.8 --top-p 0.9
    python tools/generate.py --load ckpt --greedy --prompt "..."        # argmax decoding
    python tools/generate.py --load ckpt --server --port 5000            # HTTP JSON on 127.0.0.1
                                     # (also OpenAI's /v1/completions and /v1/chat/completions)
    torchrun --nproc_per_node=2 tools/generate.py --load ckpt --prompt "..."   # tp = 2
    torchrun --nproc_per_node=4 tools/generate.py --load ckpt --pipeline-model-parallel-size 2 ...

Under torchrun the model is split over all ranks: pp = --pipeline-model-parallel-size stages of
tp = world / pp ranks; rank 0 prints (or serves HTTP). The tokenizer is the one the checkpoint was
trained with (a HF directory: its vocab.json/merges.txt, tokenizer.model or tokenizer.json); the
tokenizer flags override it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


from megatron_lite.cli import report_user_error, run_main  # noqa: E402
from megatron_lite.errors import UserError  # noqa: E402
from megatron_lite.inference.engine import DEFAULT_MAX_REQUESTS  # noqa: E402
from megatron_lite.inference.generation import (  # noqa: E402
    SamplingParams,
    generate,
)
from megatron_lite.inference.tool_args import (  # noqa: E402
    add_checkpoint_args,
    finish_tool,
    load_for_tool,
    tool_parallel_state,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p)
    p.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="Pipeline stages under torchrun (tp = world size / this).",
    )
    p.add_argument("--prompt", help="Text to continue (not with --server).")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy.")
    p.add_argument("--top-k", type=int, default=0, help="Sample from the k likeliest (0: all).")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (1: off).")
    p.add_argument("--greedy", action="store_true", help="Always the likeliest token.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kv-cache", action="store_true", help="Recompute the whole sequence.")
    p.add_argument("--no-stop-at-eod", action="store_true", help="Go on past end-of-document.")
    srv = p.add_argument_group("server")
    srv.add_argument("--server", action="store_true", help="Serve POST /generate (JSON).")
    srv.add_argument("--host", default="127.0.0.1", help="Address to bind (default loopback).")
    srv.add_argument("--port", type=int, default=5000)
    srv.add_argument("--max-request-bytes", type=int, default=64 * 1024)
    srv.add_argument("--max-prompt-tokens", type=int, help="Default: the model's positions - 1.")
    srv.add_argument("--max-new-tokens-limit", type=int, default=256)
    srv.add_argument(
        "--inference-max-requests",
        "--max-batch-size",  # the older spelling of Megatron's text generation server
        type=int,
        default=DEFAULT_MAX_REQUESTS,
        help="Requests decoded together (continuous batching); more wait their turn.",
    )
    srv.add_argument(
        "--served-model-name", help="The model id of /v1/models (default: --load's name)."
    )
    srv.add_argument(
        "--chat-template",
        "--sft-tokenizer-prompt-format",
        default="default",
        help="default (the tokenizer's own, else built-in), chatml, plain, or a Jinja file "
        "(as tools/preprocess_sft_data.py takes it).",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        rc = _main(build_parser().parse_args(argv))
    except (UserError, ValueError, FileNotFoundError) as e:  # bad flags, files, lengths
        rc = report_user_error(e)  # one line, from one rank
    return finish_tool(rc)


def _main(args: argparse.Namespace) -> int:
    if not args.server and args.prompt is None:
        print("error: give --prompt, or --server", file=sys.stderr)
        return 2
    if args.server and args.inference_max_requests < 1:
        raise UserError(f"--inference-max-requests must be >= 1, got {args.inference_max_requests}")
    ps = tool_parallel_state(None, args.pipeline_model_parallel_size)
    lm, tokenizer = load_for_tool(args, ps)
    if args.server:
        return _serve(args, ps, lm, tokenizer)
    params = SamplingParams(0.0 if args.greedy else args.temperature, args.top_k, args.top_p)
    eod = None if args.no_stop_at_eod else getattr(tokenizer, "eod", None)
    out = generate(
        lm,
        tokenizer.tokenize(args.prompt),
        args.max_new_tokens,
        params,
        eod=eod,
        use_cache=not args.no_kv_cache,
        seed=args.seed,
    )
    if ps.rank == 0:
        ids = out.tokens[:-1] if out.finish_reason == "eod" else out.tokens
        print(
            json.dumps(
                {
                    "completion": tokenizer.detokenize(ids),
                    "tokens": out.tokens,
                    "finish_reason": out.finish_reason,
                }
            )
        )
    return 0


def _serve(args: argparse.Namespace, ps, lm, tokenizer) -> int:
    """--server: the first rank serves HTTP, the others follow its engine's steps."""
    from megatron_lite.data.chat import ChatFormat, template_choice
    from megatron_lite.inference.server import GenerationServer, follow, is_serving_rank

    template = template_choice(args.chat_template)
    ChatFormat.for_tokenizer(tokenizer, template)  # a bad one fails on every rank
    if not is_serving_rank(ps):
        follow(lm, tokenizer, args.inference_max_requests)
        return 0
    server = GenerationServer(
        lm,
        tokenizer,
        args.host,
        args.port,
        max_request_bytes=args.max_request_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens_limit,
        default_new_tokens=args.max_new_tokens,
        max_batch_size=args.inference_max_requests,
        model_name=args.served_model_name,
        chat_template=template,
    )
    host, port = server.address
    print(
        f"serving POST http://{host}:{port}/generate, /v1/completions, /v1/chat/completions "
        f"as {server.limits['model']!r} (tp={ps.tp_size}, pp={ps.pp_size}, "
        f"{args.inference_max_requests} requests at once)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
