"""megatron_lite: Megatron-style 3D-parallel GPT pretraining on torch.distributed."""

__version__ = "0.1.0"
