"""The data pipeline: tokenizers, Megatron `.bin/.idx` files, GPT samples, blending, sampling.

Names are imported lazily, so the tools that only tokenize (preprocess_data, train_tokenizer) do
not pay for importing torch.
"""

import importlib

_EXPORTS = {
    "build_tokenizer": "tokenizer",
    "build_train_valid_test_datasets": "builder",
    "train_valid_test_num_samples": "builder",
    "parse_blend": "builder",
    "MegatronPretrainingSampler": "sampler",
    "build_pretraining_data_loader": "sampler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatron_lite.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatron_lite.data' has no attribute {name!r}")
