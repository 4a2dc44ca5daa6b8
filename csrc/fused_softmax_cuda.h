// C interface of the CUDA fused softmax kernels (fused_softmax_cuda.cu). Torch-free and CUDA-free, so
// the glue in fused_kernels.cpp and the kernels compile separately (and the .cu compiles in ~1 s).
#pragma once
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { ML_SOFTMAX_FLOAT32 = 0, ML_SOFTMAX_BFLOAT16 = 1, ML_SOFTMAX_FLOAT16 = 2 } ml_softmax_dtype;

typedef enum {
  ML_SOFTMAX_OK = 0,
  ML_SOFTMAX_BAD_ARGUMENT = 1,
  ML_SOFTMAX_LAUNCH_FAILED = 2
} ml_softmax_status;

// Rows of `cols` contiguous elements. Row r is query r % sq. mask (may be null): bool bytes
// [mb, 1, sq, cols] where mb is 1 (mask_broadcast_batch) or the batch, a batch element spanning
// heads_x_sq rows. causal: key j > query i is masked (sq == cols). `stream` is a cudaStream_t.
ml_softmax_status ml_softmax_forward_cuda(const void* x, void* y, const uint8_t* mask,
                                          ml_softmax_dtype dtype, int64_t rows, int64_t cols,
                                          int64_t sq, int64_t heads_x_sq, bool mask_broadcast_batch,
                                          bool causal, float scale, void* stream);

ml_softmax_status ml_softmax_backward_cuda(const void* grad_y, const void* y, void* grad_x,
                                           const uint8_t* mask, ml_softmax_dtype dtype,
                                           int64_t rows, int64_t cols, int64_t sq,
                                           int64_t heads_x_sq, bool mask_broadcast_batch,
                                           bool causal, float scale, void* stream);

const char* ml_softmax_error_string(ml_softmax_status status);

#ifdef __cplusplus
}
#endif
