// Fused scaled (masked) softmax, CPU implementation, bound as a torch extension.
// The CUDA twin lives in fused_softmax_cuda.cu and is compiled only where CUDA is available.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/python.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

// One pass over each row for the max, one for exp and sum, one to normalize; rows in parallel.
at::Tensor scaled_softmax_forward(const at::Tensor& input, double scale) {
  TORCH_CHECK(input.device().is_cpu(), "scaled_softmax_forward: CPU tensor expected");
  TORCH_CHECK(input.scalar_type() == at::kFloat, "scaled_softmax_forward: float32 expected");
  auto x = input.contiguous();
  auto out = at::empty_like(x);
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* in = src + r * cols;
      float* o = dst + r * cols;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, in[c] * s);
      float sum = 0.f;
      for (int64_t c = 0; c < cols; ++c) {
        o[c] = std::exp(in[c] * s - mx);
        sum += o[c];
      }
      const float inv = 1.f / sum;
      for (int64_t c = 0; c < cols; ++c) o[c] *= inv;
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_lite fused softmax kernels";
  m.def("scaled_softmax_forward", &scaled_softmax_forward, "softmax(scale * x) over the last dim");
}
