// CUDA fused scaled masked softmax, forward and backward: one thread block per row, the row's max and
// sum reduced with warp shuffles, math in fp32, I/O in fp32, bf16 or fp16. Same semantics as the CPU
// kernels in fused_kernels.cpp: masked scores are -10000 (a fully masked row is uniform), the causal
// tail is skipped and written as 0, and the gradient is 0 wherever the input was masked.
// Torch-free: the glue in fused_kernels.cpp (WITH_CUDA) passes raw pointers and the stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fused_softmax_cuda.h"

namespace {

constexpr float kMaskValue = -10000.0f;
thread_local cudaError_t last_launch_error = cudaSuccess;  // for ml_softmax_error_string

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <bool IsMax>
__device__ __forceinline__ float block_reduce(float v) {
  __shared__ float partial[32];
  __shared__ float result;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = IsMax ? fmaxf(v, other) : v + other;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? partial[lane] : (IsMax ? -INFINITY : 0.0f);
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, v, offset);
      v = IsMax ? fmaxf(v, other) : v + other;
    }
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

struct RowInfo {
  const uint8_t* mask;  // this row's mask or null
  int64_t valid;        // entries before the causal tail
};

__device__ __forceinline__ RowInfo row_info(int64_t r, int64_t cols, int64_t sq, int64_t heads_x_sq,
                                            const uint8_t* mask, bool bcast, bool causal) {
  RowInfo info;
  info.mask = nullptr;
  if (mask != nullptr) {
    const int64_t b = bcast ? 0 : r / heads_x_sq;
    info.mask = mask + (b * sq + r % sq) * cols;
  }
  info.valid = causal ? min(r % sq + 1, cols) : cols;
  return info;
}

template <typename T>
__global__ void softmax_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                       const uint8_t* __restrict__ mask, int64_t cols, int64_t sq,
                                       int64_t heads_x_sq, bool bcast, bool causal, float scale) {
  const int64_t r = blockIdx.x;
  const RowInfo row = row_info(r, cols, sq, heads_x_sq, mask, bcast, causal);
  const T* xr = x + r * cols;
  T* yr = y + r * cols;
  float mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < row.valid; c += blockDim.x) {
    const float v = (row.mask != nullptr && row.mask[c]) ? kMaskValue : to_float(xr[c]) * scale;
    mx = fmaxf(mx, v);
  }
  mx = block_reduce<true>(mx);
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < row.valid; c += blockDim.x) {
    const float v = (row.mask != nullptr && row.mask[c]) ? kMaskValue : to_float(xr[c]) * scale;
    sum += __expf(v - mx);
  }
  const float inv = 1.0f / block_reduce<false>(sum);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float out = 0.0f;
    if (c < row.valid) {
      const float v = (row.mask != nullptr && row.mask[c]) ? kMaskValue : to_float(xr[c]) * scale;
      out = __expf(v - mx) * inv;
    }
    yr[c] = from_float<T>(out);
  }
}

template <typename T>
__global__ void softmax_backward_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                        T* __restrict__ dx, const uint8_t* __restrict__ mask,
                                        int64_t cols, int64_t sq, int64_t heads_x_sq, bool bcast,
                                        bool causal, float scale) {
  const int64_t r = blockIdx.x;
  const RowInfo row = row_info(r, cols, sq, heads_x_sq, mask, bcast, causal);
  const T* dyr = dy + r * cols;
  const T* yr = y + r * cols;
  T* dxr = dx + r * cols;
  float dot = 0.0f;
  for (int64_t c = threadIdx.x; c < row.valid; c += blockDim.x) {
    dot += to_float(dyr[c]) * to_float(yr[c]);
  }
  dot = block_reduce<false>(dot);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float g = 0.0f;
    if (c < row.valid && !(row.mask != nullptr && row.mask[c])) {
      g = scale * to_float(yr[c]) * (to_float(dyr[c]) - dot);
    }
    dxr[c] = from_float<T>(g);
  }
}

int threads_for(int64_t cols) {
  if (cols <= 64) return 32;
  if (cols <= 512) return 128;
  if (cols <= 2048) return 256;
  return 512;
}

bool bad_shape(int64_t rows, int64_t cols, int64_t sq, int64_t heads_x_sq, const void* mask) {
  return rows < 0 || cols <= 0 || sq <= 0 || rows > 2147483647LL ||
         (mask != nullptr && heads_x_sq <= 0);
}

template <typename T>
ml_softmax_status launch_forward(const void* x, void* y, const uint8_t* mask, int64_t rows,
                                 int64_t cols, int64_t sq, int64_t heads_x_sq, bool bcast,
                                 bool causal, float scale, cudaStream_t stream) {
  if (rows == 0) return ML_SOFTMAX_OK;
  softmax_forward_kernel<T><<<static_cast<unsigned>(rows), threads_for(cols), 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(y), mask, cols, sq, heads_x_sq, bcast, causal,
      scale);
  last_launch_error = cudaGetLastError();
  return last_launch_error == cudaSuccess ? ML_SOFTMAX_OK : ML_SOFTMAX_LAUNCH_FAILED;
}

template <typename T>
ml_softmax_status launch_backward(const void* dy, const void* y, void* dx, const uint8_t* mask,
                                  int64_t rows, int64_t cols, int64_t sq, int64_t heads_x_sq,
                                  bool bcast, bool causal, float scale, cudaStream_t stream) {
  if (rows == 0) return ML_SOFTMAX_OK;
  softmax_backward_kernel<T><<<static_cast<unsigned>(rows), threads_for(cols), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(y), static_cast<T*>(dx), mask, cols, sq,
      heads_x_sq, bcast, causal, scale);
  last_launch_error = cudaGetLastError();
  return last_launch_error == cudaSuccess ? ML_SOFTMAX_OK : ML_SOFTMAX_LAUNCH_FAILED;
}

}  // namespace

extern "C" ml_softmax_status ml_softmax_forward_cuda(const void* x, void* y, const uint8_t* mask,
                                                     ml_softmax_dtype dtype, int64_t rows,
                                                     int64_t cols, int64_t sq, int64_t heads_x_sq,
                                                     bool mask_broadcast_batch, bool causal,
                                                     float scale, void* stream) {
  if (bad_shape(rows, cols, sq, heads_x_sq, mask)) return ML_SOFTMAX_BAD_ARGUMENT;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case ML_SOFTMAX_FLOAT32:
      return launch_forward<float>(x, y, mask, rows, cols, sq, heads_x_sq, mask_broadcast_batch,
                                   causal, scale, s);
    case ML_SOFTMAX_BFLOAT16:
      return launch_forward<__nv_bfloat16>(x, y, mask, rows, cols, sq, heads_x_sq,
                                           mask_broadcast_batch, causal, scale, s);
    case ML_SOFTMAX_FLOAT16:
      return launch_forward<__half>(x, y, mask, rows, cols, sq, heads_x_sq, mask_broadcast_batch,
                                    causal, scale, s);
  }
  return ML_SOFTMAX_BAD_ARGUMENT;
}

extern "C" ml_softmax_status ml_softmax_backward_cuda(const void* grad_y, const void* y,
                                                      void* grad_x, const uint8_t* mask,
                                                      ml_softmax_dtype dtype, int64_t rows,
                                                      int64_t cols, int64_t sq, int64_t heads_x_sq,
                                                      bool mask_broadcast_batch, bool causal,
                                                      float scale, void* stream) {
  if (bad_shape(rows, cols, sq, heads_x_sq, mask)) return ML_SOFTMAX_BAD_ARGUMENT;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case ML_SOFTMAX_FLOAT32:
      return launch_backward<float>(grad_y, y, grad_x, mask, rows, cols, sq, heads_x_sq,
                                    mask_broadcast_batch, causal, scale, s);
    case ML_SOFTMAX_BFLOAT16:
      return launch_backward<__nv_bfloat16>(grad_y, y, grad_x, mask, rows, cols, sq, heads_x_sq,
                                            mask_broadcast_batch, causal, scale, s);
    case ML_SOFTMAX_FLOAT16:
      return launch_backward<__half>(grad_y, y, grad_x, mask, rows, cols, sq, heads_x_sq,
                                     mask_broadcast_batch, causal, scale, s);
  }
  return ML_SOFTMAX_BAD_ARGUMENT;
}

extern "C" const char* ml_softmax_error_string(ml_softmax_status status) {
  switch (status) {
    case ML_SOFTMAX_OK: return "ok";
    case ML_SOFTMAX_BAD_ARGUMENT: return "bad argument (shape or dtype)";
    case ML_SOFTMAX_LAUNCH_FAILED: return cudaGetErrorString(last_launch_error);
  }
  return "unknown status";
}
