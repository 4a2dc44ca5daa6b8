# GPU image for clusters. NGC's PyTorch image ships CUDA, NCCL and NVIDIA's apex; megatron_lite builds
# its extensions (including the CUDA fused softmax) against that torch.
#   docker build -t megatron_lite .
#   docker run --gpus all --ipc=host -it megatron_lite \
#       torchrun --nproc_per_node=8 -m megatron_lite.pretrain_gpt --help
FROM nvcr.io/nvidia/pytorch:24.08-py3

WORKDIR /workspace/megatron_lite
COPY . .
# --no-build-isolation: build against the image's torch instead of downloading another one
RUN pip install --no-cache-dir regex sentencepiece tensorboard pybind11 ninja pytest pytest-timeout \
 && TORCH_CUDA_ARCH_LIST="8.0 9.0" pip install --no-cache-dir --no-build-isolation -e . \
 && python -c "import megatron_lite._helpers, torch, megatron_lite._fused_kernels"

ENV OMP_NUM_THREADS=1
CMD ["bash"]
