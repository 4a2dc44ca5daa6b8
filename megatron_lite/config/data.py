"""Datasets and tokenizer (--data-path, --split, --tokenizer-type ...)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config.flags import ConfigError, flag, require

# --tokenizer-type values (the tools that tokenize accept the same ones)
TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)


@dataclass
class DataConfig:
    data_path: list[str] = flag(
        [], "Dataset prefix(es), optionally weighted: '0.7 prefixA 0.3 prefixB'.", nargs="*"
    )
    split: str = flag("969,30,1", "Train,valid,test proportions over documents.")
    train_data_path: list[str] = flag(
        [],
        "Training data only (instead of --data-path and --split), optionally weighted.",
        nargs="*",
    )
    valid_data_path: list[str] = flag([], "Validation data only, optionally weighted.", nargs="*")
    test_data_path: list[str] = flag([], "Test data only, optionally weighted.", nargs="*")
    data_cache_path: str | None = flag(None, "Where index caches go (default next to the data).")
    mock_data: bool = flag(False, "Synthetic tokens instead of --data-path.", action="store_true")
    tokenizer_type: str | None = flag(None, "Tokenizer.", choices=list(TOKENIZER_TYPES))
    vocab_file: str | None = flag(None, "GPT-2 vocab.json.")
    merge_file: str | None = flag(None, "GPT-2 merges.txt.")
    tokenizer_model: str | None = flag(
        None, "SentencePiece model file, or a HuggingFace tokenizer directory (or hub name)."
    )
    vocab_size: int | None = flag(None, "Vocabulary size of the NullTokenizer.", type=int)
    eod_mask_loss: bool = flag(
        False, "Do not train on end-of-document tokens.", action="store_true"
    )
    reset_position_ids: bool = flag(
        False, "Restart position ids after each end-of-document.", action="store_true"
    )
    reset_attention_mask: bool = flag(
        False, "Do not attend across end-of-document tokens.", action="store_true"
    )
    num_workers: int = flag(0, "DataLoader worker processes.", type=int)
    sft: bool = flag(
        False,
        "Supervised fine-tuning: --data-path names conversations from "
        "tools/preprocess_sft_data.py, packed whole per sample; only assistant tokens count in "
        "the loss, positions and attention restart per conversation.",
        action="store_true",
    )
    dpo: bool = flag(
        False,
        "Direct preference optimization: --data-path names preference pairs from "
        "tools/preprocess_sft_data.py --task dpo (see --dpo-beta).",
        action="store_true",
    )

    def __post_init__(self) -> None:
        parts = self.split.replace("/", ",").split(",")
        try:
            weights = [float(p) for p in parts if p.strip()]
        except ValueError:
            raise ConfigError(
                f"--split must be comma-separated numbers like 969,30,1, got {self.split!r}"
            ) from None
        require(
            0 < len(weights) <= 3 and all(w >= 0 for w in weights) and sum(weights) > 0,
            f"--split needs 1 to 3 non-negative numbers with a positive sum, got {self.split!r}",
        )
        for name in ("sft", "dpo"):
            require(
                not (getattr(self, name) and self.mock_data),
                f"--{name} trains on conversations from tools/preprocess_sft_data.py; "
                "--mock-data has none (give --data-path)",
            )
        require(not (self.sft and self.dpo), "use only one of --sft and --dpo")
        per_split = self.train_data_path or self.valid_data_path or self.test_data_path
        require(
            not (per_split and self.data_path),
            "give either --data-path (split by --split) or --train-data-path / --valid-data-path "
            "/ --test-data-path, not both",
        )
        require(
            not per_split or self.train_data_path or self.mock_data,
            "--valid-data-path / --test-data-path need --train-data-path",
        )
        if self.tokenizer_type == "GPT2BPETokenizer" and not self.mock_data:
            require(
                self.vocab_file is not None and self.merge_file is not None,
                "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file",
            )
        if self.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
            require(
                self.tokenizer_model is not None,
                f"--tokenizer-type {self.tokenizer_type} needs --tokenizer-model",
            )
        if self.tokenizer_type == "NullTokenizer":
            require(
                self.vocab_size is not None and self.vocab_size > 0,
                "--tokenizer-type NullTokenizer needs a positive --vocab-size",
            )
