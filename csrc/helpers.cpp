// Dataset index helpers (pybind11, no torch), used by megatron_lite/data/helpers.py.
// Each function has a numpy twin there; the tests check both give identical arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

// Megatron's greedy blending: sample i comes from the dataset whose share is furthest behind its
// weight, i.e. argmax_d (weight[d] * max(i, 1) - count[d]); ties go to the lowest index.
// Returns (dataset_index[size] uint8, dataset_sample_index[size] int64).
static py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                                        int64_t size) {
  const auto w = weights.unchecked<1>();
  const int64_t n = w.shape(0);
  if (n <= 0 || n > 255) throw std::invalid_argument("build_blending_indices: need 1 to 255 datasets");
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be non-negative");
  py::array_t<uint8_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  auto di = dataset_index.mutable_unchecked<1>();
  auto dsi = dataset_sample_index.mutable_unchecked<1>();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> counts(n, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double scale = i > 0 ? static_cast<double>(i) : 1.0;
      int64_t best = 0;
      double best_err = w(0) * scale - static_cast<double>(counts[0]);
      for (int64_t d = 1; d < n; ++d) {
        const double err = w(d) * scale - static_cast<double>(counts[d]);
        if (err > best_err) {
          best_err = err;
          best = d;
        }
      }
      di(i) = static_cast<uint8_t>(best);
      dsi(i) = counts[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "megatron_lite dataset index helpers";
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "Greedy blending indices: (dataset_index uint8, dataset_sample_index int64).");
}
