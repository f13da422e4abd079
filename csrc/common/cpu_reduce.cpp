#include "common/cpu_reduce.h"

#include "common/dispatch.h"
#include "common/sum_order.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KF_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KF_SIMD_CLONES
#endif

namespace koopfast {
namespace {

// The lane order of common/sum_order.h (the CUDA kernels reproduce it: keep them in step).
static_assert(kDotLanes == 8, "the loops below hold eight lanes");

template <class T>
inline double dot_impl(const double* x, const T* y, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += x[i + k] * widen<double>(y[i + k]);
  }
  for (; i < n; ++i) acc[i & 7] += x[i] * widen<double>(y[i]);
  return combine_lanes(acc);
}

template <class T>
inline void dot4_impl(const double* x, const T* const y[4], int64_t n, double out[4]) {
  double acc[4][8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int r = 0; r < 4; ++r) {
      for (int k = 0; k < 8; ++k) acc[r][k] += x[i + k] * widen<double>(y[r][i + k]);
    }
  }
  for (; i < n; ++i) {
    for (int r = 0; r < 4; ++r) acc[r][i & 7] += x[i] * widen<double>(y[r][i]);
  }
  for (int r = 0; r < 4; ++r) out[r] = combine_lanes(acc[r]);
}

}  // namespace

KF_SIMD_CLONES void dot4_f64(const double* x, const float* const y[4], int64_t n, double out[4]) {
  dot4_impl(x, y, n, out);
}
KF_SIMD_CLONES void dot4_f64(const double* x, const c10::BFloat16* const y[4], int64_t n, double out[4]) {
  dot4_impl(x, y, n, out);
}
KF_SIMD_CLONES void dot4_f64(const double* x, const c10::Half* const y[4], int64_t n, double out[4]) {
  dot4_impl(x, y, n, out);
}

KF_SIMD_CLONES double dot_f64(const double* x, const double* y, int64_t n) { return dot_impl(x, y, n); }
KF_SIMD_CLONES double dot_f64(const double* x, const float* y, int64_t n) { return dot_impl(x, y, n); }
KF_SIMD_CLONES double dot_f64(const double* x, const c10::BFloat16* y, int64_t n) { return dot_impl(x, y, n); }
KF_SIMD_CLONES double dot_f64(const double* x, const c10::Half* y, int64_t n) { return dot_impl(x, y, n); }

KF_SIMD_CLONES void axpy_f64(double* y, double c, const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += c * x[i];
}

}  // namespace koopfast
