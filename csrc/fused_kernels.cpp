// Fused scaled masked softmax (Megatron-LM's scaled_[upper_triang_]masked_softmax), forward and
// backward, bound as a torch extension. CPU implementation here; with WITH_CUDA the CUDA kernels of
// fused_softmax_cuda.cu (torch-free) are dispatched to for CUDA tensors.
//
//   y = softmax(where(mask, -10000, scale * x))      (rows of the last dim)
//   dx = scale * y * (dy - sum(dy * y)),  0 where masked
//
// Masks: none; causal (key j > query i is masked; the row's tail is skipped, not computed); or a bool
// padding mask [b or 1, 1, sq, sk] (True = masked) broadcast over heads. Math in fp32; inputs fp32,
// bf16 or fp16. Rows run in parallel (at::parallel_for); each row is one pass for the max, one for
// exp and sum, one to normalize, over contiguous memory: AVX2+FMA code (8 floats at a time, exp as a
// polynomial) where the CPU has it, chosen at run time, and portable loops elsewhere.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fused_softmax_cuda.h"
#endif

namespace {

constexpr float kMaskValue = -10000.0f;

#define ML_INLINE inline __attribute__((always_inline))

// exp(x) for x <= 0 (softmax arguments): 2^n * e^r with |r| <= ln2/2 and Cephes' degree-5
// polynomial (about 1 ulp); 0 below -87. The AVX2 twin exp8 below computes the same thing.
ML_INLINE float fast_exp(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// ---- portable rows (any CPU) ----------------------------------------------------------------------

// One row, fp32: y[0:n) = softmax of the (scaled, masked) first n entries; y[n:cols) = 0.
void softmax_row_scalar(const float* x, const uint8_t* mask, float* y, int64_t n, int64_t cols,
                        float scale) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    const float v = (mask != nullptr && mask[c]) ? kMaskValue : x[c] * scale;
    y[c] = v;
    mx = std::max(mx, v);
  }
  float sum = 0.0f;
  for (int64_t c = 0; c < n; ++c) {
    y[c] = fast_exp(y[c] - mx);
    sum += y[c];
  }
  const float inv = 1.0f / sum;
  for (int64_t c = 0; c < n; ++c) y[c] *= inv;
  for (int64_t c = n; c < cols; ++c) y[c] = 0.0f;
}

// One row, fp32: dx = scale * y * (dy - <dy, y>) over the first n entries, 0 where masked/after n.
void softmax_backward_row_scalar(const float* dy, const float* y, const uint8_t* mask, float* dx,
                                 int64_t n, int64_t cols, float scale) {
  float dot = 0.0f;
  for (int64_t c = 0; c < n; ++c) dot += dy[c] * y[c];
  for (int64_t c = 0; c < n; ++c) {
    dx[c] = (mask != nullptr && mask[c]) ? 0.0f : scale * y[c] * (dy[c] - dot);
  }
  for (int64_t c = n; c < cols; ++c) dx[c] = 0.0f;
}

void bf16_to_float_scalar(const uint16_t* in, float* out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const uint32_t bits = static_cast<uint32_t>(in[c]) << 16;
    std::memcpy(&out[c], &bits, sizeof(float));
  }
}

void float_to_bf16_scalar(const float* in, uint16_t* out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    uint32_t bits;
    std::memcpy(&bits, &in[c], sizeof(float));
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even (inputs are finite)
    out[c] = static_cast<uint16_t>(bits >> 16);
  }
}

// ---- AVX2 + FMA rows, chosen at run time where the CPU has them --------------------------------
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ML_AVX2 1
#include <immintrin.h>
#define ML_TARGET __attribute__((target("avx2,fma")))

ML_TARGET ML_INLINE __m256 exp8(__m256 x) {
  const __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), e);
}

ML_TARGET ML_INLINE __m256 mask8(const uint8_t* m) {  // all-ones lanes where masked
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(w, _mm256_setzero_si256()));
}

ML_TARGET ML_INLINE float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

ML_TARGET ML_INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

ML_TARGET void softmax_row_avx2(const float* x, const uint8_t* mask, float* y, int64_t n,
                                int64_t cols, float scale) {
  const __m256 vscale = _mm256_set1_ps(scale), vmasked = _mm256_set1_ps(kMaskValue);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + c), vscale);
    if (mask != nullptr) v = _mm256_blendv_ps(v, vmasked, mask8(mask + c));
    _mm256_storeu_ps(y + c, v);
    vmax = _mm256_max_ps(vmax, v);
  }
  float mx = hmax8(vmax);
  for (; c < n; ++c) {
    const float v = (mask != nullptr && mask[c]) ? kMaskValue : x[c] * scale;
    y[c] = v;
    mx = std::max(mx, v);
  }
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (c = 0; c + 8 <= n; c += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(y + c), vmx));
    _mm256_storeu_ps(y + c, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum8(vsum);
  for (; c < n; ++c) {
    y[c] = fast_exp(y[c] - mx);
    sum += y[c];
  }
  const float inv = 1.0f / sum;
  const __m256 vinv = _mm256_set1_ps(inv);
  for (c = 0; c + 8 <= n; c += 8) _mm256_storeu_ps(y + c, _mm256_mul_ps(_mm256_loadu_ps(y + c), vinv));
  for (; c < n; ++c) y[c] *= inv;
  for (c = n; c < cols; ++c) y[c] = 0.0f;
}

ML_TARGET void softmax_backward_row_avx2(const float* dy, const float* y, const uint8_t* mask,
                                         float* dx, int64_t n, int64_t cols, float scale) {
  __m256 vdot = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    vdot = _mm256_fmadd_ps(_mm256_loadu_ps(dy + c), _mm256_loadu_ps(y + c), vdot);
  }
  float dot = hsum8(vdot);
  for (; c < n; ++c) dot += dy[c] * y[c];
  const __m256 vd = _mm256_set1_ps(dot), vscale = _mm256_set1_ps(scale);
  for (c = 0; c + 8 <= n; c += 8) {
    const __m256 yy = _mm256_mul_ps(_mm256_loadu_ps(y + c), vscale);
    __m256 g = _mm256_mul_ps(yy, _mm256_sub_ps(_mm256_loadu_ps(dy + c), vd));
    if (mask != nullptr) g = _mm256_andnot_ps(mask8(mask + c), g);
    _mm256_storeu_ps(dx + c, g);
  }
  for (; c < n; ++c) dx[c] = (mask != nullptr && mask[c]) ? 0.0f : scale * y[c] * (dy[c] - dot);
  for (c = n; c < cols; ++c) dx[c] = 0.0f;
}

ML_TARGET void bf16_to_float_avx2(const uint16_t* in, float* out, int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + c)));
    _mm256_storeu_ps(out + c, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  bf16_to_float_scalar(in + c, out + c, n - c);
}

ML_TARGET void float_to_bf16_avx2(const float* in, uint16_t* out, int64_t n) {
  int64_t c = 0;
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
  for (; c + 8 <= n; c += 8) {
    __m256i b = _mm256_castps_si256(_mm256_loadu_ps(in + c));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), one);
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(bias, lsb)), 16);
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), packed);
  }
  float_to_bf16_scalar(in + c, out + c, n - c);
}

bool simd_enabled = true;  // tests switch it off to check the portable rows

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes && simd_enabled;
}
#else
bool simd_enabled = false;
bool has_avx2() { return false; }
#endif

// Returns whether the AVX2 rows were in use, then enables/disables them (for tests).
bool set_simd_enabled(bool enabled) {
  const bool before = has_avx2();
  simd_enabled = enabled;
  return before;
}

// ---- dispatch ----------------------------------------------------------------------------------

void softmax_row(const float* x, const uint8_t* mask, float* y, int64_t n, int64_t cols,
                 float scale) {
#ifdef ML_AVX2
  if (has_avx2()) return softmax_row_avx2(x, mask, y, n, cols, scale);
#endif
  softmax_row_scalar(x, mask, y, n, cols, scale);
}

void softmax_backward_row(const float* dy, const float* y, const uint8_t* mask, float* dx,
                          int64_t n, int64_t cols, float scale) {
#ifdef ML_AVX2
  if (has_avx2()) return softmax_backward_row_avx2(dy, y, mask, dx, n, cols, scale);
#endif
  softmax_backward_row_scalar(dy, y, mask, dx, n, cols, scale);
}

void bf16_to_float(const uint16_t* in, float* out, int64_t n) {
#ifdef ML_AVX2
  if (has_avx2()) return bf16_to_float_avx2(in, out, n);
#endif
  bf16_to_float_scalar(in, out, n);
}

void float_to_bf16(const float* in, uint16_t* out, int64_t n) {
#ifdef ML_AVX2
  if (has_avx2()) return float_to_bf16_avx2(in, out, n);
#endif
  float_to_bf16_scalar(in, out, n);
}

template <typename T>
struct Row;  // how a row of T becomes fp32 and back

template <>
struct Row<float> {
  static const float* load(const float* in, float*, int64_t) { return in; }
  static float* out_buffer(float* out, float*) { return out; }
  static void store(const float*, float*, int64_t) {}
};

template <>
struct Row<at::BFloat16> {
  static const float* load(const at::BFloat16* in, float* buf, int64_t n) {
    bf16_to_float(reinterpret_cast<const uint16_t*>(in), buf, n);
    return buf;
  }
  static float* out_buffer(at::BFloat16*, float* buf) { return buf; }
  static void store(const float* buf, at::BFloat16* out, int64_t n) {
    float_to_bf16(buf, reinterpret_cast<uint16_t*>(out), n);
  }
};

template <>
struct Row<at::Half> {
  static const float* load(const at::Half* in, float* buf, int64_t n) {
    for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<float>(in[c]);
    return buf;
  }
  static float* out_buffer(at::Half*, float* buf) { return buf; }
  static void store(const float* buf, at::Half* out, int64_t n) {
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<at::Half>(buf[c]);
  }
};

// Where row r's mask and valid length come from.
struct RowLayout {
  int64_t rows, cols, sq, heads_x_sq;  // heads_x_sq = np * sq rows per batch element
  const uint8_t* mask;                 // [mb, 1, sq, sk] or null
  bool mask_broadcast_batch, causal;

  const uint8_t* mask_row(int64_t r) const {
    if (mask == nullptr) return nullptr;
    const int64_t b = mask_broadcast_batch ? 0 : r / heads_x_sq;
    return mask + (b * sq + r % sq) * cols;
  }
  int64_t valid(int64_t r) const { return causal ? std::min(r % sq + 1, cols) : cols; }
};

int64_t grain_for(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

template <typename T>
void forward_rows(const T* x, T* y, const RowLayout& L, float scale) {
  at::parallel_for(0, L.rows, grain_for(L.cols), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same<T, float>::value ? 0 : 2 * L.cols);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * L.cols, n = L.valid(r);
      const float* xf = Row<T>::load(x + off, buf.data(), n);
      float* yf = Row<T>::out_buffer(y + off, buf.data() + (buf.empty() ? 0 : L.cols));
      softmax_row(xf, L.mask_row(r), yf, n, L.cols, scale);
      Row<T>::store(yf, y + off, L.cols);
    }
  });
}

template <typename T>
void backward_rows(const T* dy, const T* y, T* dx, const RowLayout& L, float scale) {
  at::parallel_for(0, L.rows, grain_for(L.cols), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same<T, float>::value ? 0 : 3 * L.cols);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * L.cols, n = L.valid(r);
      float* b = buf.data();
      const float* dyf = Row<T>::load(dy + off, b, n);
      const float* yf = Row<T>::load(y + off, buf.empty() ? nullptr : b + L.cols, n);
      float* dxf = Row<T>::out_buffer(dx + off, buf.empty() ? nullptr : b + 2 * L.cols);
      softmax_backward_row(dyf, yf, L.mask_row(r), dxf, n, L.cols, scale);
      Row<T>::store(dxf, dx + off, L.cols);
    }
  });
}

// ---- argument checks and layouts -----------------------------------------------------------------

void check_dtype(const at::Tensor& t, const char* what) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, what,
              ": float32, bfloat16 or float16 expected, got ", st);
}

RowLayout layout(const at::Tensor& x, const at::Tensor* mask, bool causal, const char* what) {
  TORCH_CHECK(x.dim() >= 2 || (!causal && mask == nullptr && x.dim() >= 1), what,
              ": input needs at least 2 dims, got ", x.sizes());
  RowLayout L{};
  L.cols = x.size(-1);
  L.rows = L.cols == 0 ? 0 : x.numel() / L.cols;
  L.sq = x.dim() >= 2 ? x.size(-2) : 1;
  L.causal = causal;
  if (causal) TORCH_CHECK(L.sq == L.cols, what, ": causal softmax needs sq == sk, got ", x.sizes());
  if (mask != nullptr) {
    TORCH_CHECK(x.dim() == 4, what, ": input [b, np, sq, sk] expected, got ", x.sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool, what, ": bool mask expected");
    TORCH_CHECK(mask->dim() == 4 && (mask->size(0) == 1 || mask->size(0) == x.size(0)) &&
                    mask->size(1) == 1 && mask->size(2) == L.sq && mask->size(3) == L.cols,
                what, ": mask [b or 1, 1, sq, sk] expected, got ", mask->sizes(), " for input ",
                x.sizes());
    TORCH_CHECK(mask->is_contiguous(), what, ": contiguous mask expected");
    L.mask = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
    L.mask_broadcast_batch = mask->size(0) == 1;
    L.heads_x_sq = x.size(1) * L.sq;
  }
  return L;
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor* mask, bool causal, double scale,
                       const char* what) {
  check_dtype(input, what);
  auto x = input.contiguous();
  auto y = at::empty_like(x);
  const RowLayout L = layout(x, mask, causal, what);
  const float s = static_cast<float>(scale);
  switch (x.scalar_type()) {
    case at::kFloat: forward_rows(x.data_ptr<float>(), y.data_ptr<float>(), L, s); break;
    case at::kBFloat16:
      forward_rows(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), L, s);
      break;
    default: forward_rows(x.data_ptr<at::Half>(), y.data_ptr<at::Half>(), L, s); break;
  }
  return y;
}

at::Tensor backward_cpu(const at::Tensor& grad, const at::Tensor& out, const at::Tensor* mask,
                        bool causal, double scale, const char* what) {
  check_dtype(out, what);
  TORCH_CHECK(grad.sizes() == out.sizes() && grad.scalar_type() == out.scalar_type(), what,
              ": grad and output must match, got ", grad.sizes(), " and ", out.sizes());
  auto dy = grad.contiguous();
  auto y = out.contiguous();
  auto dx = at::empty_like(y);
  const RowLayout L = layout(y, mask, causal, what);
  const float s = static_cast<float>(scale);
  switch (y.scalar_type()) {
    case at::kFloat:
      backward_rows(dy.data_ptr<float>(), y.data_ptr<float>(), dx.data_ptr<float>(), L, s);
      break;
    case at::kBFloat16:
      backward_rows(dy.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(),
                    dx.data_ptr<at::BFloat16>(), L, s);
      break;
    default:
      backward_rows(dy.data_ptr<at::Half>(), y.data_ptr<at::Half>(), dx.data_ptr<at::Half>(), L,
                    s);
      break;
  }
  return dx;
}

#ifdef WITH_CUDA
ml_softmax_dtype cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ML_SOFTMAX_FLOAT32;
    case at::kBFloat16: return ML_SOFTMAX_BFLOAT16;
    default: return ML_SOFTMAX_FLOAT16;
  }
}

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor* mask, bool causal, double scale,
                        const char* what) {
  check_dtype(input, what);
  c10::cuda::CUDAGuard guard(input.device());
  auto x = input.contiguous();
  auto y = at::empty_like(x);
  const RowLayout L = layout(x, mask, causal, what);
  ml_softmax_status st = ml_softmax_forward_cuda(
      x.data_ptr(), y.data_ptr(), L.mask, cuda_dtype(x), L.rows, L.cols, L.sq, L.heads_x_sq,
      L.mask_broadcast_batch, causal, static_cast<float>(scale),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(st == ML_SOFTMAX_OK, what, ": CUDA kernel failed: ", ml_softmax_error_string(st));
  return y;
}

at::Tensor backward_cuda(const at::Tensor& grad, const at::Tensor& out, const at::Tensor* mask,
                         bool causal, double scale, const char* what) {
  check_dtype(out, what);
  c10::cuda::CUDAGuard guard(out.device());
  auto dy = grad.contiguous();
  auto y = out.contiguous();
  auto dx = at::empty_like(y);
  const RowLayout L = layout(y, mask, causal, what);
  ml_softmax_status st = ml_softmax_backward_cuda(
      dy.data_ptr(), y.data_ptr(), dx.data_ptr(), L.mask, cuda_dtype(y), L.rows, L.cols, L.sq,
      L.heads_x_sq, L.mask_broadcast_batch, causal, static_cast<float>(scale),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(st == ML_SOFTMAX_OK, what, ": CUDA kernel failed: ", ml_softmax_error_string(st));
  return dx;
}
#endif

at::Tensor forward(const at::Tensor& x, const at::Tensor* mask, bool causal, double scale,
                   const char* what) {
  if (mask != nullptr) TORCH_CHECK(mask->device() == x.device(), what, ": mask on another device");
#ifdef WITH_CUDA
  if (x.is_cuda()) return forward_cuda(x, mask, causal, scale, what);
#endif
  TORCH_CHECK(x.device().is_cpu(), what, ": CPU tensor expected (built without CUDA)");
  return forward_cpu(x, mask, causal, scale, what);
}

at::Tensor backward(const at::Tensor& grad, const at::Tensor& out, const at::Tensor* mask,
                    bool causal, double scale, const char* what) {
#ifdef WITH_CUDA
  if (out.is_cuda()) return backward_cuda(grad, out, mask, causal, scale, what);
#endif
  TORCH_CHECK(out.device().is_cpu(), what, ": CPU tensor expected (built without CUDA)");
  return backward_cpu(grad, out, mask, causal, scale, what);
}

// ---- the bound functions -----------------------------------------------------------------------

at::Tensor scaled_softmax_forward(const at::Tensor& x, double scale) {
  return forward(x, nullptr, false, scale, "scaled_softmax_forward");
}
at::Tensor scaled_softmax_backward(const at::Tensor& grad, const at::Tensor& out, double scale) {
  return backward(grad, out, nullptr, false, scale, "scaled_softmax_backward");
}
at::Tensor scaled_masked_softmax_forward(const at::Tensor& x, const at::Tensor& mask,
                                         double scale) {
  return forward(x, &mask, false, scale, "scaled_masked_softmax_forward");
}
at::Tensor scaled_masked_softmax_backward(const at::Tensor& grad, const at::Tensor& out,
                                          const at::Tensor& mask, double scale) {
  return backward(grad, out, &mask, false, scale, "scaled_masked_softmax_backward");
}
at::Tensor scaled_upper_triang_masked_softmax_forward(const at::Tensor& x, double scale) {
  return forward(x, nullptr, true, scale, "scaled_upper_triang_masked_softmax_forward");
}
at::Tensor scaled_upper_triang_masked_softmax_backward(const at::Tensor& grad,
                                                       const at::Tensor& out, double scale) {
  return backward(grad, out, nullptr, true, scale, "scaled_upper_triang_masked_softmax_backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_lite fused scaled masked softmax kernels (CPU; CUDA when built with it)";
#ifdef WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.def("set_simd_enabled", &set_simd_enabled,
        "use the AVX2 rows where the CPU has them (default) or the portable ones; returns the old state");
  m.def("scaled_softmax_forward", &scaled_softmax_forward, "softmax(scale * x) over the last dim");
  m.def("scaled_softmax_backward", &scaled_softmax_backward, "gradient of scaled_softmax_forward");
  m.def("scaled_masked_softmax_forward", &scaled_masked_softmax_forward,
        "softmax(scale * x masked_fill(mask, -10000)); mask [b or 1, 1, sq, sk] bool");
  m.def("scaled_masked_softmax_backward", &scaled_masked_softmax_backward,
        "gradient of scaled_masked_softmax_forward (zero where masked)");
  m.def("scaled_upper_triang_masked_softmax_forward", &scaled_upper_triang_masked_softmax_forward,
        "causal softmax(scale * x) over [..., s, s]");
  m.def("scaled_upper_triang_masked_softmax_backward",
        &scaled_upper_triang_masked_softmax_backward, "gradient of the causal softmax");
}
