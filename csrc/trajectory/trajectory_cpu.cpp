// CPU backend of the trajectory ops (contract in trajectory.h). All three are bandwidth-bound
// passes over the snapshot buffer; dot products use dot_f64's eight partial sums (vectorized)
// and per-chunk partials added in chunk order (thread-count independent).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <complex>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/chunks.h"
#include "common/cpu_loops.h"
#include "common/cpu_reduce.h"
#include "common/views.h"
#include "trajectory/trajectory.h"
#include "trajectory/trajectory_args.h"

namespace koopfast {
namespace {

constexpr int64_t kBlock = kDotBlock;  // elements per inner block: 64 KB of float64 (L2), 32 KB runs per row

// The value stored for θ: round_S(θ - a), the difference taken in float64 and rounded through
// float32 (as torch's double -> half/bfloat16 conversion does).
template <class S>
KF_INLINE S to_storage(double x, const float* anchor, int64_t i) {
  const double v = anchor ? x - static_cast<double>(anchor[i]) : x;
  return static_cast<S>(static_cast<float>(v));
}

// Stores n values of a run with stride `stride`: row[i] = round_S(p - a), out[i] = that value widened.
// Returns a sum that is NaN if any θ or stored value is not finite (x - x is 0 only for finite x):
// a reduction without branches, so the unit-stride loop vectorizes.
template <class P, class S>
KF_INLINE double stage_run(const P* p, int64_t stride, int64_t n, const float* anchor, double* out, S* row) {
  double nonfinite = 0.0;
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) {
      const double x = widen<double>(p[i]);
      const S s = to_storage<S>(x, anchor, i);
      const double d = widen<double>(s);
      out[i] = d;
      row[i] = s;
      nonfinite += (x - x) + (d - d);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const double x = widen<double>(p[i * stride]);
      const S s = to_storage<S>(x, anchor, i);
      const double d = widen<double>(s);
      out[i] = d;
      row[i] = s;
      nonfinite += (x - x) + (d - d);
    }
  }
  return nonfinite;
}

// Stores elements [begin, begin + m) of parameter `view` (row: their place in the new snapshot
// row) and widens them into out[]; false if any θ or stored value is not finite.
template <class S>
bool stage(const TensorView& view, int64_t begin, int64_t m, const float* anchor, double* out, S* row) {
  double nonfinite = 0.0;
  dispatch_float(view.dtype, [&](auto ptag) {
    using P = typename decltype(ptag)::type;
    const P* base = static_cast<const P*>(view.data);
    for_each_run(view, begin, begin + m, [&](int64_t off, int64_t stride, int64_t n, int64_t flat) {
      const int64_t k = flat - begin;
      nonfinite += stage_run<P, S>(base + off, stride, n, anchor ? anchor + k : nullptr, out + k, row + k);
    });
  });
  return nonfinite == 0.0;
}

template <class S>
void ingest_cpu(const IngestInputs& in, S* W, const float* anchor, double* dots, int64_t* status) {
  const auto chunks = make_chunks(in.params, kIngestChunk);
  const int64_t nd = static_cast<int64_t>(in.dot_slots.size());
  const int64_t n = in.n;
  S* new_row = W + in.slot * n;
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};

  // One pass: write the new row and take its inner products while its block is in cache.
  const std::vector<double> total =
      chunk_sums(static_cast<int64_t>(chunks.size()), nd + kNumExtraDots, [&](int64_t c, double* part) {
        const Chunk& ch = chunks[c];
        const int64_t base = in.offsets[ch.tensor];
        double buf[kBlock];
        for (int64_t b0 = ch.begin; b0 < ch.end; b0 += kBlock) {
          const int64_t m = std::min(kBlock, ch.end - b0);
          const float* a = anchor ? anchor + base + b0 : nullptr;
          if (!stage<S>(in.params[ch.tensor], b0, m, a, buf, new_row + base + b0)) {
            int64_t cur = bad.load();
            while (ch.tensor < cur && !bad.compare_exchange_weak(cur, ch.tensor)) {
            }
            return;
          }
          int64_t j = 0;
          for (; j + 4 <= nd; j += 4) {  // four rows per read of the new block
            const S* rows[4];
            double d[4];
            for (int r = 0; r < 4; ++r) rows[r] = W + in.dot_slots[j + r] * n + base + b0;
            dot4_f64(buf, rows, m, d);
            for (int r = 0; r < 4; ++r) part[j + r] += d[r];
          }
          for (; j < nd; ++j) part[j] += dot_f64(buf, W + in.dot_slots[j] * n + base + b0, m);
          part[nd + kSelfDot] += dot_f64(buf, buf, m);
          if (a) part[nd + kAnchorDot] += dot_f64(buf, a, m);
        }
      });
  if (bad.load() != std::numeric_limits<int64_t>::max()) {
    *status = bad.load();
    std::fill(dots, dots + nd + kNumExtraDots, 0.0);
    return;
  }
  std::copy(total.begin(), total.end(), dots);
  *status = -1;
}

std::tuple<at::Tensor, at::Tensor> trajectory_ingest_cpu(at::TensorList params, at::Tensor& snapshots, int64_t slot,
                                                         at::IntArrayRef dot_slots,
                                                         const c10::optional<at::Tensor>& anchor) {
  constexpr const char* op = "trajectory_ingest";
  const IngestInputs in = prepare_ingest(op, params, snapshots, slot, dot_slots, anchor);
  auto dots = at::empty({static_cast<int64_t>(in.dot_slots.size()) + kNumExtraDots},
                        snapshots.options().dtype(c10::kDouble));
  auto status = at::empty({1}, snapshots.options().dtype(c10::kLong));
  const float* a = anchor.has_value() ? anchor->data_ptr<float>() : nullptr;
  dispatch_float(to_dtype(snapshots.scalar_type(), op, "snapshots"), [&](auto stag) {
    using S = typename decltype(stag)::type;
    if constexpr (!std::is_same_v<S, double>) {
      ingest_cpu<S>(in, static_cast<S*>(snapshots.data_ptr()), a, dots.data_ptr<double>(),
                    status.data_ptr<int64_t>());
    }
  });
  return {dots, status};
}

// ---- combine ----------------------------------------------------------------------------------------

// out(q, n) for coefficient column q: real output [m, N] (per = 1) or complex [m, N] seen as
// [m, N, 2] (per = 2, q = 2 j + part).
template <class S, class O>
void combine_cpu(const S* W, int64_t capacity, int64_t n, const double* coef, int64_t cols, int per,
                 const float* anchor, O* out) {
  std::vector<int64_t> rows;  // rows with a nonzero coefficient: the others are not read
  for (int64_t t = 0; t < capacity; ++t) {
    for (int64_t q = 0; q < cols; ++q) {
      if (coef[t * cols + q] != 0.0) {
        rows.push_back(t);
        break;
      }
    }
  }
  std::vector<double> coef_sum(static_cast<size_t>(cols), 0.0);
  for (int64_t t : rows) {
    for (int64_t q = 0; q < cols; ++q) coef_sum[q] += coef[t * cols + q];
  }
  const int64_t n_blocks = (n + kCombineChunk - 1) / kCombineChunk;
  at::parallel_for(0, n_blocks, 1, [&](int64_t bb, int64_t be) {
    constexpr int64_t B = 256;
    std::vector<double> acc(static_cast<size_t>(cols * B));
    double w[B];
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t end = std::min(n, (blk + 1) * kCombineChunk);
      for (int64_t n0 = blk * kCombineChunk; n0 < end; n0 += B) {
        const int64_t m = std::min(B, end - n0);
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t t : rows) {
          const S* src = W + t * n + n0;
          for (int64_t i = 0; i < m; ++i) w[i] = widen<double>(src[i]);
          for (int64_t q = 0; q < cols; ++q) {
            const double c = coef[t * cols + q];
            if (c != 0.0) axpy_f64(acc.data() + q * B, c, w, m);
          }
        }
        if (anchor) {
          for (int64_t i = 0; i < m; ++i) w[i] = static_cast<double>(anchor[n0 + i]);
          for (int64_t q = 0; q < cols; ++q) axpy_f64(acc.data() + q * B, coef_sum[q], w, m);
        }
        for (int64_t q = 0; q < cols; ++q) {
          O* dst = out + (q / per) * n * per + (q % per);
          const double* aq = acc.data() + q * B;
          for (int64_t i = 0; i < m; ++i) dst[(n0 + i) * per] = static_cast<O>(aq[i]);
        }
      }
    }
  });
}

at::Tensor trajectory_combine_cpu(const at::Tensor& snapshots, const at::Tensor& coeffs,
                                  const c10::optional<at::Tensor>& anchor, bool wide) {
  constexpr const char* op = "trajectory_combine";
  const CombineInputs in = prepare_combine(op, snapshots, coeffs, anchor, wide);
  if (in.empty()) return in.out;
  const float* a = anchor.has_value() ? anchor->data_ptr<float>() : nullptr;
  void* dst = in.out.data_ptr();
  dispatch_float(to_dtype(snapshots.scalar_type(), op, "snapshots"), [&](auto stag) {
    using S = typename decltype(stag)::type;
    if constexpr (!std::is_same_v<S, double>) {
      const S* W = static_cast<const S*>(snapshots.data_ptr());
      const double* coef = in.coef.data_ptr<double>();
      if (wide) {
        combine_cpu<S, double>(W, in.capacity, in.n, coef, in.cols, in.per, a, static_cast<double*>(dst));
      } else {
        combine_cpu<S, float>(W, in.capacity, in.n, coef, in.cols, in.per, a, static_cast<float*>(dst));
      }
    }
  });
  return in.out;
}

// ---- dots -------------------------------------------------------------------------------------------

template <class S, class V>
std::vector<double> dots_cpu(const S* W, int64_t capacity, int64_t n, const V* vec, int64_t m, const float* anchor) {
  const int64_t rows = capacity + (anchor ? 1 : 0);
  const int64_t n_chunks = (n + kIngestChunk - 1) / kIngestChunk;
  return chunk_sums(n_chunks, rows * m, [&](int64_t c, double* part) {
    const int64_t end = std::min(n, (c + 1) * kIngestChunk);
    double v[kBlock];
    for (int64_t n0 = c * kIngestChunk; n0 < end; n0 += kBlock) {
      const int64_t len = std::min(kBlock, end - n0);
      for (int64_t j = 0; j < m; ++j) {
        for (int64_t i = 0; i < len; ++i) v[i] = static_cast<double>(vec[j * n + n0 + i]);
        int64_t t = 0;
        for (; t + 4 <= capacity; t += 4) {  // four rows per read of the staged vector block
          const S* rows[4] = {W + t * n + n0, W + (t + 1) * n + n0, W + (t + 2) * n + n0, W + (t + 3) * n + n0};
          double d[4];
          dot4_f64(v, rows, len, d);
          for (int r = 0; r < 4; ++r) part[(t + r) * m + j] += d[r];
        }
        for (; t < capacity; ++t) part[t * m + j] += dot_f64(v, W + t * n + n0, len);
        if (anchor) part[capacity * m + j] += dot_f64(v, anchor + n0, len);
      }
    }
  });
}

at::Tensor trajectory_dots_cpu(const at::Tensor& snapshots, const at::Tensor& vectors,
                               const c10::optional<at::Tensor>& anchor) {
  constexpr const char* op = "trajectory_dots";
  const DotsInputs in = prepare_dots(op, snapshots, vectors, anchor);
  if (in.empty()) return in.out;
  const float* a = anchor.has_value() ? anchor->data_ptr<float>() : nullptr;
  dispatch_float(to_dtype(snapshots.scalar_type(), op, "snapshots"), [&](auto stag) {
    using S = typename decltype(stag)::type;
    if constexpr (!std::is_same_v<S, double>) {
      const S* W = static_cast<const S*>(snapshots.data_ptr());
      const std::vector<double> total =
          in.vec.scalar_type() == c10::kDouble
              ? dots_cpu<S, double>(W, in.capacity, in.n, in.vec.data_ptr<double>(), in.m, a)
              : dots_cpu<S, float>(W, in.capacity, in.n, in.vec.data_ptr<float>(), in.m, a);
      std::copy(total.begin(), total.end(), in.out.data_ptr<double>());
    }
  });
  return in.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CPU, m) {
  m.impl("trajectory_ingest", &trajectory_ingest_cpu);
  m.impl("trajectory_combine", &trajectory_combine_cpu);
  m.impl("trajectory_dots", &trajectory_dots_cpu);
}

}  // namespace koopfast
