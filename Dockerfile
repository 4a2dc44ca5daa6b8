# GPU image for clusters, on NVIDIA's PyTorch base (CUDA, NCCL, cuDNN and NVIDIA's apex included);
# megatron_lite's extensions, the CUDA fused softmax among them, are built against the image's torch.
#
#   docker build -t megatron_lite .                                    # sm_80 + sm_90 kernels
#   docker build --build-arg TORCH_CUDA_ARCH_LIST="9.0" -t megatron_lite .
#   docker run --gpus all --ipc=host --rm megatron_lite python -m pytest -q            # the test suite
#   docker run --gpus all --ipc=host --rm megatron_lite python -m pytest -q -m gpu     # CUDA tests only
#   docker run --gpus all --ipc=host --rm megatron_lite bash examples/pretrain_gpt_demo.sh  # CPU demo
#   docker run --gpus all --ipc=host --rm -v /data:/data megatron_lite \
#       torchrun --nproc_per_node=8 -m megatron_lite.pretrain_gpt <flags>
#
# The sbatch examples' SIGTERM handling needs torchrun's --signals-to-handle (torch >= 2.9): pick a
# base image whose release notes list PyTorch 2.9 or newer, or launch with srun alone (README).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /workspace/megatron_lite

# The image's torch and numpy stay: the packages below are the rest of pyproject.toml's dependencies
# (runtime, `hf` and `test` extras) at versions the test suite passed with.
RUN pip install --no-cache-dir \
      regex==2026.11.19 sentencepiece==0.2.3 tensorboard==2.21.0 pybind11==3.1.0 ninja==1.13.2 \
      safetensors==0.8.0 transformers==5.24.0 matplotlib==3.11.2 \
      pytest==9.2.0 pytest-timeout==2.4.0

COPY . .
# --no-build-isolation: build against the image's torch instead of downloading another one;
# --no-deps: NGC's torch is a pre-release version (2.x.0a0) that pip may try to "upgrade".
ARG TORCH_CUDA_ARCH_LIST="8.0 9.0"
RUN TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
      pip install --no-cache-dir --no-build-isolation --no-deps -e . \
 && python -c "import megatron_lite._helpers, torch, megatron_lite._fused_kernels"

ENV OMP_NUM_THREADS=1
CMD ["bash"]
