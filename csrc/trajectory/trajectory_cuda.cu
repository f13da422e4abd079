// CUDA backend of the trajectory ops (contract in trajectory.h).
//
// Results are meant to be bit-identical to the CPU kernels (trajectory_cpu.cpp): the same chunks,
// blocks, lanes and order of float64 additions, products never fused (see "fixed-order dot
// products" below). Ingest stages its tables with one asynchronous copy (no host synchronization
// in the op; record() still reads the status it returns).
//
// Verified: compiles for sm_90 (scripts/check_cuda_compiles.sh) and links and registers against
// a CUDA build of torch (scripts/check_cuda_build.sh). NOT verified: nothing here has run on a
// GPU. The equality with the CPU kernels is argued line by line in the comments; on a GPU machine
// tests/ops/test_trajectory_ops.py checks it (test_cuda_rounds_like_cpu_*), with the reference-twin
// and opcheck tests of that file.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cuda_utils.h"
#include "common/dispatch.h"
#include "common/sum_order.h"
#include "common/views.h"
#include "trajectory/trajectory.h"
#include "trajectory/trajectory_args.h"

namespace koopfast {
namespace {

constexpr int kThreads = 256;

// ---- fixed-order dot products -------------------------------------------------------------------
// Products of a stored value (float32, bfloat16 or float16, widened) and a row value or an anchor
// value have at most 24 x 24 significant bits: exact in float64. Products with float64 vectors
// (trajectory_dots) are not, and are formed by __dmul_rn, never fused into an FMA (the CPU build
// uses -ffp-contract=off). So rounding is decided by the order of additions alone, and these
// kernels add in the CPU kernels' order (trajectory_cpu.cpp, common/sum_order.h):
//   chunks of kIngestChunk elements (ingest: per parameter, make_chunks; dots: of the flat row);
//   within a chunk, blocks of kDotBlock elements; within a block, lane k sums elements
//   k, k + 8, k + 16, ... in order from +0; a block's dot is combine_lanes(lanes);
//   a chunk's partial is +0 + block 0 + block 1 + ...; a total is +0 + chunk 0 + chunk 1 + ... .
// Thread t of a CUDA block is lane t % 8 of block t / 8 of its chunk; a CUDA block covers one
// chunk and kCols columns of the output (accumulators in registers); the blocks of one chunk are
// neighbours in launch order, so the operands they share are mostly read from L2.

constexpr int kCols = 4;
static_assert((kIngestChunk / kDotBlock) * kDotLanes == kThreads, "thread t is lane t % 8 of dot block t / 8");
static_assert(kDotBlock % kDotLanes == 0, "dot blocks hold whole lane rounds");

__device__ KF_INLINE double add_product(double acc, double x, double y) { return __dadd_rn(acc, __dmul_rn(x, y)); }

// This thread's elements of a chunk of len elements: [first, end) in steps of kDotLanes, relative
// to the chunk's start (empty past the chunk's last block).
struct LaneRange {
  int64_t first;
  int64_t end;
};

__device__ KF_INLINE LaneRange lane_range(int64_t len) {
  const int64_t block_begin = static_cast<int64_t>(threadIdx.x / kDotLanes) * kDotBlock;
  const int64_t block_end = block_begin + kDotBlock < len ? block_begin + kDotBlock : len;
  return {block_begin + threadIdx.x % kDotLanes, block_end};
}

// partial[q] for q < ncols: the chunk's dot product of column q from every thread's lane sums
// acc[q], combined in the CPU's order. Called by every thread of the block.
__device__ void store_chunk_partials(const double (&acc)[kCols], int64_t len, int ncols, double* partial) {
  __shared__ double lane_sums[kCols][kThreads];
  for (int q = 0; q < kCols; ++q) lane_sums[q][threadIdx.x] = acc[q];
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < ncols) {
    const int q = threadIdx.x;
    const int64_t blocks = (len + kDotBlock - 1) / kDotBlock;
    double part = 0.0;
    for (int64_t b = 0; b < blocks; ++b) part += combine_lanes(&lane_sums[q][b * kDotLanes]);
    partial[q] = part;
  }
  __syncthreads();  // lane_sums is rewritten for the next chunk
}

// out[k] = +0 + partials[0][k] + partials[1][k] + ... (chunk order), for k < width; eight loads
// in flight per thread, added in order.
__device__ KF_INLINE double sum_over_chunks(const double* partials, int64_t num_chunks, int64_t width, int64_t k) {
  double total = 0.0;
  int64_t c = 0;
  for (; c + 8 <= num_chunks; c += 8) {
    double v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = partials[(c + u) * width + k];
#pragma unroll
    for (int u = 0; u < 8; ++u) total += v[u];
  }
  for (; c < num_chunks; ++c) total += partials[c * width + k];
  return total;
}

// ---- ingest -----------------------------------------------------------------------------------------

struct IngestArgs {
  const TensorView* params;  // on the device
  const Chunk* chunks;       // make_chunks(params, kIngestChunk): the CPU kernel's chunks
  int64_t num_chunks;
  const int64_t* offsets;    // first flat index of each parameter in a row
  const int64_t* dot_slots;  // [nd]
  int64_t nd;
  int64_t n;
  int64_t slot;
  const float* anchor;
  double* partials;          // [num_chunks, nd + kNumExtraDots]
  double* dots;              // [nd + kNumExtraDots]
  long long* status;         // LLONG_MAX while clean, else the first bad tensor; -1 once reduced clean
};

enum ColumnKind : int { kRowColumn, kSelfColumn, kAnchorColumn, kNoColumn };

// One chunk, columns [col0, col0 + kCols): lane sums into acc. The block holding column 0 (the
// writer) also stores the new row and reports whether a value is not finite.
template <class S, class P>
__device__ KF_INLINE bool ingest_lanes(const IngestArgs& args, S* W, const TensorView& view, const Chunk& ch,
                                       int64_t col0, double (&acc)[kCols]) {
  const int64_t len = ch.end - ch.begin;
  const LaneRange lane = lane_range(len);
  const int64_t row0 = args.offsets[ch.tensor] + ch.begin;  // the chunk's first index in a row
  const bool writer = col0 == 0;
  const S* rows[kCols];
  int kinds[kCols];
#pragma unroll
  for (int q = 0; q < kCols; ++q) {
    const int64_t col = col0 + q;
    rows[q] = nullptr;
    if (col < args.nd) {
      kinds[q] = kRowColumn;
      rows[q] = W + args.dot_slots[col] * args.n + row0;
    } else if (col == args.nd + kSelfDot) {
      kinds[q] = kSelfColumn;
    } else if (col == args.nd + kAnchorDot && args.anchor != nullptr) {
      kinds[q] = kAnchorColumn;
    } else {
      kinds[q] = kNoColumn;  // past the last column, or the anchor column without an anchor: +0
    }
  }
  const P* p = static_cast<const P*>(view.data);
  const bool contiguous = view.contiguous();
  const float* anchor = args.anchor != nullptr ? args.anchor + row0 : nullptr;
  S* new_row = W + args.slot * args.n + row0;
  bool bad = false;
  for (int64_t i = lane.first; i < lane.end; i += kDotLanes) {
    const int64_t e = ch.begin + i;
    const double x = widen<double>(contiguous ? p[e] : p[view.offset(e)]);
    const double a = anchor != nullptr ? static_cast<double>(anchor[i]) : 0.0;
    // round_S(θ - a): the difference in float64, rounded through float32 (as on the CPU).
    const S s = static_cast<S>(static_cast<float>(anchor != nullptr ? x - a : x));
    const double d = widen<double>(s);
    if (writer) {
      new_row[i] = s;  // the row is a free one: written whatever happens
      bad |= !(isfinite(x) && isfinite(d));
    }
#pragma unroll
    for (int q = 0; q < kCols; ++q) {
      if (kinds[q] == kRowColumn) {
        acc[q] = add_product(acc[q], d, widen<double>(rows[q][i]));
      } else if (kinds[q] == kSelfColumn) {
        acc[q] = add_product(acc[q], d, d);
      } else if (kinds[q] == kAnchorColumn) {
        acc[q] = add_product(acc[q], d, a);
      }
    }
  }
  return bad;
}

template <class S>
__global__ void __launch_bounds__(kThreads) ingest_dots_kernel(IngestArgs args, S* W) {
  __shared__ SharedView shared_view;  // the chunk's parameter, read from global memory once per chunk
  TensorView& view = view_in(shared_view);
  const int64_t width = args.nd + kNumExtraDots;
  const int64_t groups = (width + kCols - 1) / kCols;
  for (int64_t work = blockIdx.x; work < args.num_chunks * groups; work += gridDim.x) {
    const int64_t c = work / groups;
    const int64_t col0 = (work % groups) * kCols;
    const Chunk ch = args.chunks[c];
    if (threadIdx.x == 0) view = args.params[ch.tensor];
    __syncthreads();
    double acc[kCols] = {0.0, 0.0, 0.0, 0.0};
    bool bad = false;
    switch (view.dtype) {
      case DType::Float16: bad = ingest_lanes<S, c10::Half>(args, W, view, ch, col0, acc); break;
      case DType::BFloat16: bad = ingest_lanes<S, c10::BFloat16>(args, W, view, ch, col0, acc); break;
      case DType::Float32: bad = ingest_lanes<S, float>(args, W, view, ch, col0, acc); break;
      default: bad = ingest_lanes<S, double>(args, W, view, ch, col0, acc); break;
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) atomicMin(args.status, static_cast<long long>(ch.tensor));
    const int ncols = static_cast<int>(width - col0 < kCols ? width - col0 : kCols);
    store_chunk_partials(acc, ch.end - ch.begin, ncols, args.partials + c * width + col0);
  }
}

// One thread per output column: partials added in chunk order; then the status is settled. One
// block, so that every thread reads the status before thread 0 rewrites it.
__global__ void __launch_bounds__(kThreads) ingest_reduce_kernel(IngestArgs args) {
  const int64_t width = args.nd + kNumExtraDots;
  const bool bad = *args.status != LLONG_MAX;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
    args.dots[j] = bad ? 0.0 : sum_over_chunks(args.partials, args.num_chunks, width, j);
  }
  __syncthreads();
  if (threadIdx.x == 0 && !bad) *args.status = -1;
}

std::tuple<at::Tensor, at::Tensor> trajectory_ingest_cuda(at::TensorList params, at::Tensor& snapshots, int64_t slot,
                                                          at::IntArrayRef dot_slots,
                                                          const c10::optional<at::Tensor>& anchor) {
  constexpr const char* op = "trajectory_ingest";
  const IngestInputs in = prepare_ingest(op, params, snapshots, slot, dot_slots, anchor);
  const c10::cuda::CUDAGuard guard(snapshots.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t nd = static_cast<int64_t>(in.dot_slots.size());
  const int64_t width = nd + kNumExtraDots;
  const std::vector<Chunk> chunks = make_chunks(in.params, kIngestChunk);
  // Views, chunks, offsets and dot slots: one pinned staging buffer, one asynchronous copy.
  const UploadedSections up = upload_sections(
      {section_of(in.params), section_of(chunks), section_of(in.offsets), section_of(in.dot_slots)},
      snapshots.device());

  auto dots = at::empty({width}, snapshots.options().dtype(c10::kDouble));
  auto status = at::full({1}, static_cast<int64_t>(LLONG_MAX), snapshots.options().dtype(c10::kLong));
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  auto partials = at::empty({std::max<int64_t>(num_chunks, 1) * width}, snapshots.options().dtype(c10::kDouble));
  IngestArgs args{reinterpret_cast<const TensorView*>(up.at[0]),
                  reinterpret_cast<const Chunk*>(up.at[1]),
                  num_chunks,
                  reinterpret_cast<const int64_t*>(up.at[2]),
                  reinterpret_cast<const int64_t*>(up.at[3]),
                  nd,
                  in.n,
                  in.slot,
                  anchor.has_value() ? anchor->data_ptr<float>() : nullptr,
                  partials.data_ptr<double>(),
                  dots.data_ptr<double>(),
                  reinterpret_cast<long long*>(status.data_ptr<int64_t>())};
  const int grid = grid_size(num_chunks * ((width + kCols - 1) / kCols));
  dispatch_float(to_dtype(snapshots.scalar_type(), op, "snapshots"), [&](auto stag) {
    using S = typename decltype(stag)::type;
    if constexpr (!std::is_same_v<S, double>) {
      S* W = static_cast<S*>(snapshots.data_ptr());
      ingest_dots_kernel<S><<<grid, kThreads, 0, stream>>>(args, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ingest_reduce_kernel<<<1, kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dots, status};
}

// ---- combine ----------------------------------------------------------------------------------------
// As on the CPU: out[q][i] = +0 + sum over rows t in order of c[t, q] * W[t, i] for c[t, q] != 0,
// then + coef_sum[q] * anchor[i], where coef_sum[q] sums c[t, q] over the rows t with a nonzero
// coefficient in some column, in row order.

constexpr int kCombineCols = 4;  // coefficient columns per thread pass (registers)

__global__ void __launch_bounds__(kThreads) coef_sum_kernel(const double* coef, int64_t capacity, int64_t cols,
                                                            double* coef_sum) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < cols;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double total = 0.0;
    for (int64_t t = 0; t < capacity; ++t) {
      bool used = false;  // the CPU kernel's row list: rows with some nonzero coefficient
      for (int64_t r = 0; r < cols && !used; ++r) used = coef[t * cols + r] != 0.0;
      if (used) total += coef[t * cols + q];
    }
    coef_sum[q] = total;
  }
}

template <class S, class O>
__global__ void __launch_bounds__(kThreads) combine_kernel(const S* W, int64_t capacity, int64_t n,
                                                           const double* coef, int64_t cols, int per,
                                                           const double* coef_sum, const float* anchor, O* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    for (int64_t q0 = 0; q0 < cols; q0 += kCombineCols) {
      double acc[kCombineCols] = {0.0, 0.0, 0.0, 0.0};
      const int64_t qn = cols - q0 < kCombineCols ? cols - q0 : kCombineCols;
      for (int64_t t = 0; t < capacity; ++t) {
        const double* ct = coef + t * cols + q0;
        bool any = false;
        for (int k = 0; k < qn; ++k) any |= ct[k] != 0.0;
        if (!any) continue;  // unused rows are not read
        const double w = widen<double>(W[t * n + i]);
        for (int k = 0; k < qn; ++k) {
          if (ct[k] != 0.0) acc[k] = add_product(acc[k], ct[k], w);  // as the CPU's axpy: zero terms skipped
        }
      }
      for (int k = 0; k < qn; ++k) {
        const int64_t q = q0 + k;
        double v = acc[k];
        if (anchor) v = add_product(v, coef_sum[q], static_cast<double>(anchor[i]));
        out[(q / per) * n * per + i * per + (q % per)] = static_cast<O>(v);
      }
    }
  }
}

at::Tensor trajectory_combine_cuda(const at::Tensor& snapshots, const at::Tensor& coeffs,
                                   const c10::optional<at::Tensor>& anchor, bool wide) {
  constexpr const char* op = "trajectory_combine";
  const CombineInputs in = prepare_combine(op, snapshots, coeffs, anchor, wide);
  if (in.empty()) return in.out;
  const c10::cuda::CUDAGuard guard(snapshots.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const double* coef = in.coef.data_ptr<double>();
  const at::Tensor coef_sum = at::empty({in.cols}, in.coef.options());
  coef_sum_kernel<<<grid_size((in.cols + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      coef, in.capacity, in.cols, coef_sum.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const float* a = anchor.has_value() ? anchor->data_ptr<float>() : nullptr;
  const int grid = grid_size((in.n + kThreads - 1) / kThreads);
  void* dst = in.out.data_ptr();
  dispatch_float(to_dtype(snapshots.scalar_type(), op, "snapshots"), [&](auto stag) {
    using S = typename decltype(stag)::type;
    if constexpr (!std::is_same_v<S, double>) {
      const S* W = static_cast<const S*>(snapshots.data_ptr());
      const double* sums = coef_sum.data_ptr<double>();
      if (wide) {
        combine_kernel<S, double><<<grid, kThreads, 0, stream>>>(W, in.capacity, in.n, coef, in.cols, in.per, sums, a,
                                                                 static_cast<double*>(dst));
      } else {
        combine_kernel<S, float><<<grid, kThreads, 0, stream>>>(W, in.capacity, in.n, coef, in.cols, in.per, sums, a,
                                                                static_cast<float*>(dst));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return in.out;
}

// ---- dots -------------------------------------------------------------------------------------------
// Column k = t * m + j of the output: <row t, vectors[j]>, row `capacity` being the anchor; chunks
// of kIngestChunk elements of the flat row, as on the CPU.

template <class S, class V>
__global__ void __launch_bounds__(kThreads) dots_kernel(const S* W, int64_t capacity, int64_t n, const V* vec,
                                                        int64_t m, const float* anchor, int64_t num_chunks,
                                                        double* partials) {
  const int64_t rows = capacity + (anchor ? 1 : 0);
  const int64_t width = rows * m;
  const int64_t groups = (width + kCols - 1) / kCols;
  for (int64_t work = blockIdx.x; work < num_chunks * groups; work += gridDim.x) {
    const int64_t c = work / groups;
    const int64_t col0 = (work % groups) * kCols;
    const int64_t begin = c * kIngestChunk;
    const int64_t len = (n - begin < kIngestChunk ? n - begin : kIngestChunk);
    const LaneRange lane = lane_range(len);
    const V* x[kCols];
    const S* y[kCols];
    const float* y_anchor[kCols];
#pragma unroll
    for (int q = 0; q < kCols; ++q) {
      const int64_t col = col0 + q < width ? col0 + q : width - 1;  // past the end: computed, never stored
      const int64_t t = col / m, j = col % m;
      x[q] = vec + j * n + begin;
      y[q] = t < capacity ? W + t * n + begin : nullptr;
      y_anchor[q] = t < capacity ? nullptr : anchor + begin;
    }
    double acc[kCols] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t i = lane.first; i < lane.end; i += kDotLanes) {
#pragma unroll
      for (int q = 0; q < kCols; ++q) {
        const double w = y[q] != nullptr ? widen<double>(y[q][i]) : static_cast<double>(y_anchor[q][i]);
        acc[q] = add_product(acc[q], static_cast<double>(x[q][i]), w);
      }
    }
    const int ncols = static_cast<int>(width - col0 < kCols ? width - col0 : kCols);
    store_chunk_partials(acc, len, ncols, partials + c * width + col0);
  }
}

__global__ void __launch_bounds__(kThreads) sum_chunks_kernel(const double* partials, int64_t num_chunks,
                                                              int64_t width, double* out) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < width;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[k] = sum_over_chunks(partials, num_chunks, width, k);
  }
}

at::Tensor trajectory_dots_cuda(const at::Tensor& snapshots, const at::Tensor& vectors,
                                const c10::optional<at::Tensor>& anchor) {
  constexpr const char* op = "trajectory_dots";
  const DotsInputs in = prepare_dots(op, snapshots, vectors, anchor);
  if (in.empty()) return in.out;
  const c10::cuda::CUDAGuard guard(snapshots.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_chunks = (in.n + kIngestChunk - 1) / kIngestChunk;
  const int64_t width = in.rows * in.m;
  at::Tensor partials = at::empty({num_chunks * width}, snapshots.options().dtype(c10::kDouble));
  double* part = partials.data_ptr<double>();
  const float* a = anchor.has_value() ? anchor->data_ptr<float>() : nullptr;
  const int grid = grid_size(num_chunks * ((width + kCols - 1) / kCols));
  dispatch_float(to_dtype(snapshots.scalar_type(), op, "snapshots"), [&](auto stag) {
    using S = typename decltype(stag)::type;
    if constexpr (!std::is_same_v<S, double>) {
      const S* W = static_cast<const S*>(snapshots.data_ptr());
      if (in.vec.scalar_type() == c10::kDouble) {
        dots_kernel<S, double><<<grid, kThreads, 0, stream>>>(W, in.capacity, in.n, in.vec.data_ptr<double>(), in.m, a,
                                                              num_chunks, part);
      } else {
        dots_kernel<S, float><<<grid, kThreads, 0, stream>>>(W, in.capacity, in.n, in.vec.data_ptr<float>(), in.m, a,
                                                             num_chunks, part);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  sum_chunks_kernel<<<grid_size((width + kThreads - 1) / kThreads), kThreads, 0, stream>>>(part, num_chunks, width,
                                                                                           in.out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return in.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CUDA, m) {
  m.impl("trajectory_ingest", &trajectory_ingest_cuda);
  m.impl("trajectory_combine", &trajectory_combine_cuda);
  m.impl("trajectory_dots", &trajectory_dots_cuda);
}

}  // namespace koopfast
