// Deterministic float64 reductions for the CPU kernels.
//
// GCC keeps floating-point additions in source order, so a single accumulator makes a dot
// product latency-bound and unvectorized. dot_f64 keeps eight independent partial sums, combined
// in a fixed order: vectorizable, and the same result on every call. chunk_sums gives each chunk
// its own partial results and adds them in chunk order, so totals do not depend on how chunks
// were spread over threads.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "common/dispatch.h"

namespace koopfast {

template <class T>
inline double dot_f64(const double* x, const T* y, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += x[i + k] * widen<double>(y[i + k]);
  }
  for (; i < n; ++i) acc[i & 7] += x[i] * widen<double>(y[i]);
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

// fn(chunk, partial) fills partial[0, width) for each chunk in [0, n_chunks), in parallel; returns
// the element-wise sum over chunks, added in chunk order.
template <class F>
inline std::vector<double> chunk_sums(int64_t n_chunks, int64_t width, F&& fn) {
  std::vector<double> partials(static_cast<size_t>(n_chunks * width), 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) fn(c, partials.data() + c * width);
  });
  std::vector<double> total(static_cast<size_t>(width), 0.0);
  for (int64_t c = 0; c < n_chunks; ++c) {
    for (int64_t j = 0; j < width; ++j) total[j] += partials[c * width + j];
  }
  return total;
}

}  // namespace koopfast
