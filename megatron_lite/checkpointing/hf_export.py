"""Write any checkpoint reader (megatron_lite, or a HF directory) in Hugging Face format, one tensor at
a time: config.json, model.safetensors (or shards + index) and the tokenizer files of the run.
The tensor and config mappings live in `hf_checkpoint`."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import torch

from megatron_lite.checkpointing import weight_key
from megatron_lite.checkpointing.hf_mixtral import MIXTRAL, is_moe
from megatron_lite.checkpointing.hf_reader import HFReader, training_dtype
from megatron_lite.checkpointing.hf_rules import (
    OUTPUT_WEIGHT,
    SPECIAL_TOKENS,
    WORD_EMBEDDING,
    dtype_name,
    flavour_of,
    hf_config,
    to_hf_tensors,
)
from megatron_lite.config import Config
from megatron_lite.errors import UserError


class SafetensorsWriter:
    """Tensors to `model.safetensors`, or to numbered shards of at most `max_shard_bytes` plus
    `model.safetensors.index.json` when they do not fit one: at most one shard is in memory."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.files, self.weight_map = 0, [], {}
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = t.contiguous().clone()  # own storage: safetensors refuses shared
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.out_dir, f".shard-{len(self.files)}.safetensors")
        save_file(self.pending, path, metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.files:
            self._flush()
        n, names = len(self.files), []
        for i, (path, keys) in enumerate(self.files):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, os.path.join(self.out_dir, name))
            names.append(name)
            self.weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        return names


_HF_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _tokenizer_files(cfg: dict, hf_dir: str | None) -> tuple[dict[str, str], int | None]:
    """{destination name: source path} of the tokenizer the checkpoint was trained with, and its
    end-of-document id, when known."""
    d = cfg.get("data", {})
    kind = d.get("tokenizer_type")
    if hf_dir is not None or kind == "HuggingFaceTokenizer":
        src = hf_dir if hf_dir is not None else d.get("tokenizer_model") or ""
        files = {n: os.path.join(src, n) for n in _HF_TOKENIZER_FILES}
        files = {n: p for n, p in files.items() if os.path.isfile(p)}
        return files, None if hf_dir is not None else _eod(cfg, kind)
    files = {}
    if kind == "GPT2BPETokenizer":
        files = {"vocab.json": d.get("vocab_file"), "merges.txt": d.get("merge_file")}
    elif kind == "SentencePieceTokenizer":
        files = {"tokenizer.model": d.get("tokenizer_model")}
    files = {k: v for k, v in files.items() if v and os.path.isfile(v)}
    return files, _eod(cfg, kind)


def _eod(cfg: dict, kind: str | None) -> int | None:
    from megatron_lite.data.tokenizer import build_tokenizer

    try:
        return build_tokenizer(Config.from_dict(cfg).data).eod if kind else None
    except (ValueError, OSError):
        return None  # tokenizer files moved: the config names no eos


def export_hf(
    reader,
    out_dir: str,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    log: Callable[[str], None] = print,
) -> dict:
    """Write `reader` (megatron_lite or HF) as a HF model directory, one tensor at a time."""
    try:  # before anything is written: a missing package must not leave an empty out_dir
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise UserError(
            "exporting to Hugging Face format needs the safetensors package "
            "(pip install safetensors); nothing was written"
        ) from None
    m = reader.config["model"]
    flavour = flavour_of(m)
    if is_moe(reader.config.get("moe")):
        flavour = MIXTRAL
    os.makedirs(out_dir, exist_ok=True)
    vocab = reader.vocab_size
    writer = SafetensorsWriter(out_dir, max_shard_bytes)
    first_dtype = None
    for name in reader.names():
        if name == OUTPUT_WEIGHT and not m["untie_embeddings_and_output_weights"]:
            continue  # the tied copy on the last stage (pp > 1): HF ties lm_head to wte
        key = weight_key(reader, name)  # fp32 masters, where saved, cast to the model's dtype
        t = reader.full_tensor(name, key)
        model_dtype = training_dtype(reader.config) if key else t.dtype
        first_dtype = first_dtype or model_dtype
        t = t.to(dtype or model_dtype)
        if name in (WORD_EMBEDDING, OUTPUT_WEIGHT) and vocab is not None:
            t = t[:vocab]  # drop the rows that pad the vocabulary for tp
        for hf_name, hf_t in to_hf_tensors(m, name, t, reader.config.get("moe")):
            writer.add(hf_name, hf_t)
    files = writer.close()
    out_dtype = dtype or first_dtype or torch.float32
    is_hf = isinstance(reader, HFReader)
    tok_files, eod = _tokenizer_files(reader.config, reader.dir if is_hf else None)
    config = hf_config(reader.config, vocab or _rows(reader), out_dtype, eod)
    extra = reader.file()["extra"]
    if isinstance(extra, dict) and isinstance(extra.get("hf"), dict):  # imported from HF
        config.update({k: extra["hf"].get(k) for k in SPECIAL_TOKENS})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for dest, src in tok_files.items():
        shutil.copyfile(src, os.path.join(out_dir, dest))
    if tok_files and not is_hf and "tokenizer_config.json" not in tok_files:
        cls = "GPT2Tokenizer" if "vocab.json" in tok_files else "LlamaTokenizer"
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": cls, "model_max_length": m["max_position_embeddings"]}, f)
    log(
        f"exported {flavour} ({dtype_name(out_dtype)}, {writer.total_bytes / 2**20:.1f} MiB in "
        f"{len(files)} file(s)) to {out_dir}; tokenizer files: {sorted(tok_files) or 'none'}"
    )
    return {"flavour": flavour, "files": files, "bytes": writer.total_bytes}


def _rows(reader) -> int:
    return reader.full_tensor(WORD_EMBEDDING).shape[0]
