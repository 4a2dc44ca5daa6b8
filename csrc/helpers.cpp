// Dataset index helpers (pybind11, no torch), used by megatron_lite/data/helpers.py.
// Each function has a numpy twin there; the tests check both give identical arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
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

// Megatron's GPT sample index: the documents of `document_idx` (ids into `sizes`) form one token
// stream; sample i starts at stream position i * seq_length and spans seq_length + extra tokens
// (extra = 1: the label of the last input token comes from the next sample's first position).
// Row i of the result is (position in document_idx, token offset in that document) of sample i's
// start; row num_samples is where the last sample ends. Walking the stream document by document
// is what Megatron does; helpers.py has a vectorized numpy twin that gives identical rows.
template <typename T>
static py::array_t<T> build_sample_idx_impl(const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sizes_,
                                            const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& document_idx_,
                                            int32_t seq_length, int32_t num_epochs, int64_t tokens_per_epoch,
                                            bool drop_last_partial_sequence, int32_t extra) {
  if (seq_length <= 1) throw std::invalid_argument("build_sample_idx: seq_length must be > 1");
  if (num_epochs <= 0) throw std::invalid_argument("build_sample_idx: num_epochs must be positive");
  if (tokens_per_epoch <= 1) throw std::invalid_argument("build_sample_idx: tokens_per_epoch must be > 1");
  const auto sizes = sizes_.template unchecked<1>();
  const auto document_idx = document_idx_.template unchecked<1>();
  const int64_t num_docs = document_idx.shape(0);
  const int64_t total = static_cast<int64_t>(num_epochs) * tokens_per_epoch - extra;
  const int64_t num_samples =
      drop_last_partial_sequence ? total / seq_length : (total + seq_length - 1) / seq_length;
  py::array_t<T> result({num_samples + 1, static_cast<int64_t>(2)});
  auto out = result.template mutable_unchecked<2>();
  {
    py::gil_scoped_release release;
    int64_t doc_pos = 0;  // position in document_idx
    int64_t offset = 0;   // token offset inside that document
    out(0, 0) = 0;
    out(0, 1) = 0;
    for (int64_t row = 1; row <= num_samples; ++row) {
      int64_t remaining = static_cast<int64_t>(seq_length) + extra;
      while (remaining != 0) {
        const int64_t doc_len = sizes(document_idx(doc_pos)) - offset;
        remaining -= doc_len;
        if (remaining <= 0) {  // the sample ends inside this document
          offset += remaining + doc_len - extra;
          remaining = 0;
        } else if (doc_pos == num_docs - 1) {  // stream exhausted: a partial last sample
          offset = sizes(document_idx(doc_pos)) - extra;
          break;
        } else {
          ++doc_pos;
          offset = 0;
        }
      }
      out(row, 0) = static_cast<T>(doc_pos);
      out(row, 1) = static_cast<T>(offset);
    }
  }
  return result;
}

static py::array build_sample_idx(const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sizes,
                                  const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& document_idx,
                                  int32_t seq_length, int32_t num_epochs, int64_t tokens_per_epoch,
                                  bool drop_last_partial_sequence, int32_t add_extra_token) {
  if (document_idx.shape(0) == 0) throw std::invalid_argument("build_sample_idx: empty document_idx");
  // int32 rows when every stored value fits, as Megatron does (halves the cache file)
  int64_t max_value = document_idx.shape(0);
  const auto s = sizes.unchecked<1>();
  for (int64_t i = 0; i < s.shape(0); ++i) max_value = std::max<int64_t>(max_value, s(i));
  if (max_value <= std::numeric_limits<int32_t>::max())
    return build_sample_idx_impl<int32_t>(sizes, document_idx, seq_length, num_epochs, tokens_per_epoch,
                                          drop_last_partial_sequence, add_extra_token);
  return build_sample_idx_impl<int64_t>(sizes, document_idx, seq_length, num_epochs, tokens_per_epoch,
                                        drop_last_partial_sequence, add_extra_token);
}

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "megatron_lite dataset index helpers";
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "Greedy blending indices: (dataset_index uint8, dataset_sample_index int64).");
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("document_idx"), py::arg("seq_length"),
        py::arg("num_epochs"), py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
        py::arg("add_extra_token") = 1,
        "GPT sample index [num_samples + 1, 2] of (document_idx position, offset); int32 or int64.");
}
