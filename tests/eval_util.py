"""A tiny text model and tiny task files for the evaluation tests.

The tokenizer is a byte-level BPE (every byte a token, a few merges, `<|endoftext|>`), so any text
tokenizes; the model is a random 2-layer GPT saved as a megatron_lite checkpoint and exported to
HF format (tokenizer files included), so transformers and lm-eval read the same model.
"""

import json
import random

import torch
from factory import tiny_config

from megatron_lite.checkpointing import save_checkpoint
from megatron_lite.checkpointing.hf_export import export_hf
from megatron_lite.checkpointing.hf_reader import open_checkpoint
from megatron_lite.config import DataConfig
from megatron_lite.data.tokenizer import GPT2BPETokenizer, bytes_to_unicode
from megatron_lite.model import build_model_chunks
from megatron_lite.parallel_state import ParallelState

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("e", "n"), ("Ġ", "a"), ("i", "n")]
WORDS = "the cat dog sat ran on a mat hat in sun fun then hen red bed big pig".split()


def write_tokenizer(d) -> DataConfig:
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [a + b for a, b in MERGES] + ["<|endoftext|>"])}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return DataConfig(
        tokenizer_type="GPT2BPETokenizer",
        vocab_file=str(d / "vocab.json"),
        merge_file=str(d / "merges.txt"),
    )


def save_tiny_model(d, seq_length: int = 64) -> tuple[str, str]:
    """(checkpoint dir, HF export dir) of a random 2-layer GPT over the tiny tokenizer."""
    data = write_tokenizer(d)
    tok = GPT2BPETokenizer(data.vocab_file, data.merge_file)
    cfg = tiny_config(1, seq_length=seq_length, make_vocab_size_divisible_by=16, data=data)
    ps = ParallelState.single()
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(tok.vocab_size))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the init, so choices score differently
        for p in chunks[0].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    save_checkpoint(str(d / "ckpt"), 1, chunks, None, None, cfg, ps, 0, vocab_size=tok.vocab_size)
    export_hf(open_checkpoint(str(d / "ckpt")), str(d / "hf"), log=lambda s: None)
    return str(d / "ckpt"), str(d / "hf")


def _sentence(rnd, n) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(n))


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_tasks(d, n: int = 6, seed: int = 0) -> dict[str, str]:
    """Tiny files in each reader's public format; {task name: path}."""
    rnd = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    out["lambada"] = write_jsonl(
        d / "lambada.jsonl", [{"text": _sentence(rnd, 8)} for _ in range(n)]
    )
    hs = [
        {
            "ind": i,
            "activity_label": "Cats",
            "ctx_a": _sentence(rnd, 5) + ".",
            "ctx_b": _sentence(rnd, 3),
            "endings": [_sentence(rnd, 3) + " [title] ok." for _ in range(4)],
            "label": str(rnd.randrange(4)),
        }
        for i in range(n)
    ]
    out["hellaswag"] = write_jsonl(d / "hellaswag_val.jsonl", hs)
    arc = []
    for i in range(n):
        labels = ["A", "B", "C", "D"] if i % 2 else ["1", "2", "3"]
        choices = [_sentence(rnd, rnd.randint(1, 3)) for _ in labels]
        arc.append(
            {
                "id": f"q{i}",
                "question": _sentence(rnd, 6) + "?",
                "choices": {"text": choices, "label": labels},
                "answerKey": rnd.choice(labels),
            }
        )
    out["arc_easy"] = write_jsonl(d / "arc.jsonl", arc)
    piqa = [
        {"goal": _sentence(rnd, 5), "sol1": _sentence(rnd, 4), "sol2": _sentence(rnd, 6)}
        for _ in range(n)
    ]
    write_jsonl(d / "valid.jsonl", piqa)
    (d / "valid-labels.lst").write_text("".join(f"{rnd.randrange(2)}\n" for _ in range(n)))
    out["piqa"] = str(d / "valid.jsonl")
    out["perplexity"] = write_jsonl(
        d / "text.jsonl",
        [{"text": _sentence(rnd, 40) + "\n" + _sentence(rnd, 30)} for _ in range(3)],
    )
    out["mmlu"] = write_mmlu(d / "mmlu", rnd, n)
    return out


def mmlu_rows(rnd, n):
    return [
        [_sentence(rnd, 5) + "?", *[_sentence(rnd, 2) for _ in range(4)], rnd.choice("ABCD")]
        for _ in range(n)
    ]


def write_mmlu(d, rnd, n) -> str:
    import csv

    for split, count in (("dev", 5), ("test", n)):
        (d / "data" / split).mkdir(parents=True, exist_ok=True)
        for subject in ("high_school_biology", "astronomy"):
            with open(d / "data" / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(mmlu_rows(rnd, count))
    return str(d)
