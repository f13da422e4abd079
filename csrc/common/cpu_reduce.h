// Float64 dot products and axpys for the CPU kernels, and deterministic chunked sums.
//
// GCC keeps floating-point additions in source order, so a single accumulator makes a dot
// product latency-bound and unvectorized. dot_f64 keeps eight independent partial sums, combined
// in a fixed order: vectorizable, and the same result on every call. Its definitions are built
// for x86-64-v3 (AVX2) and the baseline, picked at load time (GCC target_clones); neither
// contracts a multiply and an add, so both give bit-identical results. chunk_sums gives each
// chunk its own partial results and adds them in chunk order, so totals do not depend on how
// chunks were spread over threads.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace koopfast {

double dot_f64(const double* x, const double* y, int64_t n);
double dot_f64(const double* x, const float* y, int64_t n);
double dot_f64(const double* x, const c10::BFloat16* y, int64_t n);
double dot_f64(const double* x, const c10::Half* y, int64_t n);

// out[r] = dot_f64(x, y[r], n) for four rows at once, bit-identical to four dot_f64 calls (same
// partial sums, same order) but reading x once.
void dot4_f64(const double* x, const float* const y[4], int64_t n, double out[4]);
void dot4_f64(const double* x, const c10::BFloat16* const y[4], int64_t n, double out[4]);
void dot4_f64(const double* x, const c10::Half* const y[4], int64_t n, double out[4]);

// y[i] += c * x[i]
void axpy_f64(double* y, double c, const double* x, int64_t n);

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
