"""Tokenize fine-tuning conversations (SFT) or preference pairs (DPO) into Megatron `.bin/.idx`.

    python tools/preprocess_sft_data.py --input chats.jsonl --output-prefix data/chats \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/
        # -> data/chats_sft_document.bin/.idx (tokens) + data/chats_sft_document_loss_mask.bin/.idx
    python tools/preprocess_sft_data.py --task dpo --input pairs.jsonl --output-prefix data/pairs ...
        # -> data/pairs_dpo_document{,_loss_mask}.bin/.idx: per pair one document of two
        #    sequences, chosen then rejected

Records (see megatron_lite/data/conversations.py): SFT `{"messages": [{role, content}, ...]}` or
`{"prompt", "response"}`; DPO `{"prompt", "chosen", "rejected"}` (strings, or messages lists).
The chat template (--sft-tokenizer-prompt-format, Megatron's flag): "default" is a HuggingFace
tokenizer's own `chat_template`, else the built-in "chatml" ("plain" for NullTokenizer); or name
"chatml"/"plain", or a file holding a Jinja template (HuggingFace tokenizers). The loss mask is a
uint8 `.bin/.idx` pair of the same shape: 1 on the tokens that count in the loss (the assistant's,
for DPO only the final response). A malformed line stops the run with its file and line, and
nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from preprocess_data import add_tokenizer_args  # noqa: E402

from megatron_lite.data.chat import ChatFormat, template_choice  # noqa: E402
from megatron_lite.data.conversations import (  # noqa: E402
    dpo_example,
    loss_mask_prefix,
    sft_example,
)
from megatron_lite.data.corpus import iter_lines, parse_json_object  # noqa: E402
from megatron_lite.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    token_dtype,
)
from megatron_lite.data.tokenizer import build_tokenizer  # noqa: E402
from megatron_lite.errors import UserError  # noqa: E402


def chat_format(args: argparse.Namespace) -> ChatFormat:
    """The ChatFormat --sft-tokenizer-prompt-format names."""
    tokenizer = build_tokenizer(args)
    template = template_choice(args.sft_tokenizer_prompt_format, "--sft-tokenizer-prompt-format")
    return ChatFormat.for_tokenizer(tokenizer, template)


def output_prefix(args: argparse.Namespace) -> str:
    return f"{args.output_prefix}_{args.task}_document"


def write(args: argparse.Namespace, fmt: ChatFormat, final: str) -> dict:
    """Tokenize every record into temporary files, renamed to `final` once all succeeded."""
    tmp = f"{final}.tmp-{os.getpid()}"
    dtype = token_dtype(fmt.tokenizer.vocab_size)
    outputs = {tmp: dtype, loss_mask_prefix(tmp): np.uint8}
    builders = {p: IndexedDatasetBuilder(data_file_path(p), d) for p, d in outputs.items()}
    stats = {"records": 0, "tokens": 0, "loss_tokens": 0}
    try:
        for path, lineno, line in iter_lines(args.input):
            obj = parse_json_object(line, path, lineno)
            if args.task == "sft":
                examples = [sft_example(obj, fmt, path, lineno)]
            else:
                examples = list(dpo_example(obj, fmt, path, lineno))
            for i, builder in enumerate(builders.values()):
                builder.add_document(
                    np.concatenate([e[i] for e in examples]), [len(e[0]) for e in examples]
                )
            stats["records"] += 1
            stats["tokens"] += sum(len(e[0]) for e in examples)
            stats["loss_tokens"] += sum(int(e[1].sum()) for e in examples)
        for p, b in builders.items():
            b.finalize(index_file_path(p))
        for p in outputs:
            target = final if p == tmp else loss_mask_prefix(final)
            for fn in (data_file_path, index_file_path):
                os.replace(fn(p), fn(target))
    finally:
        for p in outputs:
            for fn in (data_file_path, index_file_path):
                if os.path.exists(fn(p)):
                    os.unlink(fn(p))
    return stats


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help=".jsonl or .jsonl.gz file(s)")
    g.add_argument("--task", choices=["sft", "dpo"], default="sft", help="What the records are")
    g = add_tokenizer_args(p)
    g.add_argument(
        "--sft-tokenizer-prompt-format",
        "--chat-template",
        default="default",
        help="default (the tokenizer's own, else built-in), chatml, plain, or a Jinja file",
    )
    g = p.add_argument_group("output data")
    g.add_argument(
        "--output-prefix", required=True, help="Writes {prefix}_{task}_document{,_loss_mask}"
    )
    args = p.parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            p.error(f"--input {path}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    start = time.time()
    try:
        fmt = chat_format(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        stats = write(args, fmt, output_prefix(args))
    except (UserError, OSError) as e:
        print(f"error: {e}; no output written", file=sys.stderr)
        return 1
    print(
        f"done: {stats['records']} {args.task} records, {stats['tokens']} tokens, "
        f"{stats['loss_tokens']} in the loss, template {fmt.name}; {time.time() - start:.2f} s; "
        f"output {output_prefix(args)} and {loss_mask_prefix(output_prefix(args))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
