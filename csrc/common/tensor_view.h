// A torch-free description of one strided tensor, as kernels see it.
//
// Kernels walk tensors in logical row-major order (the order of `flatten()`), whatever their
// strides, so results such as "first tie in flat-index order" do not depend on memory layout.
// Sizes, strides and offsets are int64_t everywhere: a single tensor may exceed 2^31 elements.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace koopfast {

constexpr int kMaxDims = 8;

enum class DType : int32_t { Float16, BFloat16, Float32, Float64, Bool, UInt8, Int64 };

struct TensorView {
  void* data = nullptr;
  int64_t numel = 0;
  DType dtype = DType::Float32;
  // After coalescing: ndim == 1 with stride 1 is the contiguous fast path.
  int32_t ndim = 1;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  KF_HOST_DEVICE bool contiguous() const { return ndim == 1 && strides[0] == 1; }

  // Element offset of logical flat index i (division per dimension: the slow path).
  KF_HOST_DEVICE int64_t offset(int64_t i) const {
    int64_t off = 0;
    for (int d = ndim - 1; d > 0; --d) {
      const int64_t s = sizes[d];
      off += (i % s) * strides[d];
      i /= s;
    }
    return off + i * strides[0];
  }
};

// Calls f(offset, stride, count, flat_begin) for maximal runs of [begin, end) that are evenly
// strided in memory: one call for a contiguous tensor, one per innermost row otherwise.
template <class F>
inline void for_each_run(const TensorView& v, int64_t begin, int64_t end, F&& f) {
  if (begin >= end) return;
  if (v.contiguous() || v.ndim == 1) {
    f(begin * v.strides[0], v.strides[0], end - begin, begin);
    return;
  }
  const int last = v.ndim - 1;
  int64_t idx[kMaxDims];
  int64_t rem = begin;
  int64_t off = 0;
  for (int d = last; d >= 0; --d) {
    idx[d] = rem % v.sizes[d];
    rem /= v.sizes[d];
    off += idx[d] * v.strides[d];
  }
  int64_t flat = begin;
  while (flat < end) {
    const int64_t run = (v.sizes[last] - idx[last]) < (end - flat) ? (v.sizes[last] - idx[last]) : (end - flat);
    f(off, v.strides[last], run, flat);
    flat += run;
    if (flat >= end) break;
    // Carry into the outer dimensions: the run ended at the end of a row.
    off += (v.sizes[last] - idx[last]) * v.strides[last] - v.sizes[last] * v.strides[last];
    idx[last] = 0;
    for (int d = last - 1; d >= 0; --d) {
      ++idx[d];
      off += v.strides[d];
      if (idx[d] < v.sizes[d]) break;
      off -= v.sizes[d] * v.strides[d];
      idx[d] = 0;
    }
  }
}

}  // namespace koopfast
