"""GPT model built from the tensor-parallel layers, one pipeline stage (or virtual chunk) at a time."""

from megatron_lite.model.fused_softmax import FusedScaleMaskSoftmax
from megatron_lite.model.gpt import GPTModel, build_model_chunks, chunk_layer_numbers
from megatron_lite.model.transformer import InferenceParams

__all__ = [
    "FusedScaleMaskSoftmax",
    "GPTModel",
    "InferenceParams",
    "build_model_chunks",
    "chunk_layer_numbers",
]
