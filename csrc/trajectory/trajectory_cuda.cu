// CUDA backend of the trajectory ops (contract in trajectory.h). Straightforward first versions:
// per-chunk float64 partial sums written out and added in chunk order by a second kernel
// (deterministic), no atomics on data. Ingest writes the new row in the same pass that stages it
// in shared memory for the dot products. Not yet run on a GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/view_as_real.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <climits>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/cuda_utils.h"
#include "common/dispatch.h"
#include "common/views.h"
#include "trajectory/trajectory.h"
#include "trajectory/trajectory_args.h"

namespace koopfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kCudaIngestChunk = 8192;  // staged in shared memory as float: 32 KB
using Reduce = cub::BlockReduce<double, kThreads>;

template <class P>
__device__ KF_INLINE double load_param(const TensorView& v, int64_t i) {
  const P* p = static_cast<const P*>(v.data);
  return widen<double>(v.contiguous() ? p[i] : p[v.offset(i)]);
}

__device__ KF_INLINE double param_at(const TensorView& v, int64_t i) {
  switch (v.dtype) {
    case DType::Float16: return load_param<c10::Half>(v, i);
    case DType::BFloat16: return load_param<c10::BFloat16>(v, i);
    case DType::Float32: return load_param<float>(v, i);
    default: return load_param<double>(v, i);
  }
}

template <class S>
__device__ KF_INLINE S to_storage(double x, const float* anchor, int64_t i) {
  const double v = anchor ? x - static_cast<double>(anchor[i]) : x;
  return static_cast<S>(static_cast<float>(v));
}

// ---- ingest -----------------------------------------------------------------------------------------

struct IngestArgs {
  DeviceTable table;         // params as table.a, chunks of kCudaIngestChunk
  const int64_t* offsets;    // first flat index of each parameter
  const int64_t* dot_slots;  // [nd]
  int64_t nd;
  int64_t n;
  int64_t slot;
  const float* anchor;
  double* partials;          // [num_chunks, nd + 2]
  double* dots;              // [nd + 2]
  long long* status;         // LLONG_MAX while clean, else the first bad tensor; -1 once reduced clean
};

template <class S>
__global__ void __launch_bounds__(kThreads) ingest_dots_kernel(IngestArgs args, S* W) {
  __shared__ float stored[kCudaIngestChunk];
  __shared__ typename Reduce::TempStorage reduce_storage;
  __shared__ int chunk_bad;
  const int64_t width = args.nd + kNumExtraDots;
  for (int64_t c = blockIdx.x; c < args.table.num_chunks; c += gridDim.x) {
    const Chunk ch = args.table.chunks[c];
    const TensorView& view = args.table.a[ch.tensor];
    const int64_t base = args.offsets[ch.tensor] + ch.begin;
    const int64_t len = ch.end - ch.begin;
    if (threadIdx.x == 0) chunk_bad = 0;
    __syncthreads();
    double self = 0, anc = 0;
    S* new_row = W + args.slot * args.n + base;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const double x = param_at(view, ch.begin + i);
      const S s = to_storage<S>(x, args.anchor, base + i);
      const double d = widen<double>(s);
      if (!isfinite(x) || !isfinite(d)) chunk_bad = 1;
      new_row[i] = s;                     // the row is a free one: written whatever happens
      stored[i] = static_cast<float>(d);  // exact: a storage value fits in float
      self += d * d;
      if (args.anchor) anc += d * static_cast<double>(args.anchor[base + i]);
    }
    __syncthreads();
    if (chunk_bad) {
      if (threadIdx.x == 0) atomicMin(args.status, static_cast<long long>(ch.tensor));
      __syncthreads();
      continue;
    }
    double* part = args.partials + c * width;
    for (int64_t j = 0; j < args.nd; ++j) {
      const S* row = W + args.dot_slots[j] * args.n + base;
      double acc = 0;
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) acc += static_cast<double>(stored[i]) * widen<double>(row[i]);
      const double total = Reduce(reduce_storage).Sum(acc);
      if (threadIdx.x == 0) part[j] = total;
      __syncthreads();
    }
    const double self_total = Reduce(reduce_storage).Sum(self);
    __syncthreads();
    const double anc_total = Reduce(reduce_storage).Sum(anc);
    if (threadIdx.x == 0) {
      part[args.nd + kSelfDot] = self_total;
      part[args.nd + kAnchorDot] = anc_total;
    }
    __syncthreads();
  }
}

// One thread per output column: partials added in chunk order; then the status is settled.
__global__ void ingest_reduce_kernel(IngestArgs args) {
  const int64_t width = args.nd + kNumExtraDots;
  const bool bad = *args.status != LLONG_MAX;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
    double total = 0;
    if (!bad) {
      for (int64_t c = 0; c < args.table.num_chunks; ++c) total += args.partials[c * width + j];
    }
    args.dots[j] = total;
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
  const auto chunks = make_chunks(in.params, kCudaIngestChunk);
  const UploadedTable up = upload_table(in.params, {}, chunks, {}, snapshots.device());

  // Small int64 side tables (offsets, dot slots) in one device tensor.
  std::vector<int64_t> side(in.offsets);
  side.insert(side.end(), in.dot_slots.begin(), in.dot_slots.end());
  at::Tensor side_host = at::empty({static_cast<int64_t>(side.size()) + 1}, at::TensorOptions().dtype(c10::kLong));
  std::copy(side.begin(), side.end(), side_host.data_ptr<int64_t>());
  at::Tensor side_dev = side_host.to(snapshots.device(), /*non_blocking=*/false);

  auto dots = at::empty({width}, snapshots.options().dtype(c10::kDouble));
  auto status = at::full({1}, static_cast<int64_t>(LLONG_MAX), snapshots.options().dtype(c10::kLong));
  auto partials = at::empty({std::max<int64_t>(up.table.num_chunks, 1) * width}, snapshots.options().dtype(c10::kDouble));
  IngestArgs args{up.table,
                  side_dev.data_ptr<int64_t>(),
                  side_dev.data_ptr<int64_t>() + in.offsets.size(),
                  nd,
                  in.n,
                  in.slot,
                  anchor.has_value() ? anchor->data_ptr<float>() : nullptr,
                  partials.data_ptr<double>(),
                  dots.data_ptr<double>(),
                  reinterpret_cast<long long*>(status.data_ptr<int64_t>())};
  const int grid = grid_size(up.table.num_chunks);
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

constexpr int kCombineCols = 4;  // coefficient columns per thread pass (registers)

template <class S, class O>
__global__ void __launch_bounds__(kThreads) combine_kernel(const S* W, int64_t capacity, int64_t n,
                                                           const double* coef, int64_t cols, int per,
                                                           const double* coef_sum, const float* anchor, O* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    for (int64_t q0 = 0; q0 < cols; q0 += kCombineCols) {
      double acc[kCombineCols] = {0, 0, 0, 0};
      const int64_t qn = cols - q0 < kCombineCols ? cols - q0 : kCombineCols;
      for (int64_t t = 0; t < capacity; ++t) {
        const double* ct = coef + t * cols + q0;
        bool any = false;
        for (int k = 0; k < qn; ++k) any |= ct[k] != 0.0;
        if (!any) continue;  // unused rows are not read
        const double w = widen<double>(W[t * n + i]);
        for (int k = 0; k < qn; ++k) acc[k] += ct[k] * w;
      }
      for (int k = 0; k < qn; ++k) {
        const int64_t q = q0 + k;
        double v = acc[k];
        if (anchor) v += coef_sum[q] * static_cast<double>(anchor[i]);
        out[(q / per) * n * per + i * per + (q % per)] = static_cast<O>(v);
      }
    }
  }
}

at::Tensor trajectory_combine_cuda(const at::Tensor& snapshots, const at::Tensor& coeffs,
                                   const c10::optional<at::Tensor>& anchor, bool wide) {
  constexpr const char* op = "trajectory_combine";
  check_snapshots(op, snapshots);
  check_coeffs(op, coeffs, snapshots);
  check_anchor(op, anchor, snapshots);
  const c10::cuda::CUDAGuard guard(snapshots.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool complex = coeffs.is_complex();
  const int per = complex ? 2 : 1;
  const at::Tensor coef = (complex ? at::view_as_real(coeffs.contiguous()) : coeffs).contiguous().view({coeffs.size(0), -1});
  const at::Tensor coef_sum = coef.sum(0);
  const int64_t m = coeffs.size(1), n = snapshots.size(1), capacity = snapshots.size(0);
  const c10::ScalarType out_type =
      complex ? (wide ? c10::kComplexDouble : c10::kComplexFloat) : (wide ? c10::kDouble : c10::kFloat);
  at::Tensor out = at::empty({m, n}, snapshots.options().dtype(out_type));
  if (m == 0 || n == 0) return out;
  const float* a = anchor.has_value() ? anchor->data_ptr<float>() : nullptr;
  const int grid = grid_size((n + kThreads - 1) / kThreads);
  dispatch_float(to_dtype(snapshots.scalar_type(), op, "snapshots"), [&](auto stag) {
    using S = typename decltype(stag)::type;
    if constexpr (!std::is_same_v<S, double>) {
      const S* W = static_cast<const S*>(snapshots.data_ptr());
      if (wide) {
        combine_kernel<S, double><<<grid, kThreads, 0, stream>>>(W, capacity, n, coef.data_ptr<double>(), m * per, per,
                                                                 coef_sum.data_ptr<double>(), a,
                                                                 static_cast<double*>(out.data_ptr()));
      } else {
        combine_kernel<S, float><<<grid, kThreads, 0, stream>>>(W, capacity, n, coef.data_ptr<double>(), m * per, per,
                                                                coef_sum.data_ptr<double>(), a,
                                                                static_cast<float*>(out.data_ptr()));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

// ---- dots -------------------------------------------------------------------------------------------

constexpr int64_t kCudaDotsChunk = int64_t{1} << 16;

// Block (chunk c, row t): partial[c][t][j] = sum over the chunk of row_t * vectors[j].
template <class S, class V>
__global__ void __launch_bounds__(kThreads) dots_kernel(const S* W, int64_t capacity, int64_t n, const V* vec,
                                                        int64_t m, const float* anchor, int64_t num_chunks,
                                                        double* partials) {
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int64_t rows = capacity + (anchor ? 1 : 0);
  for (int64_t work = blockIdx.x; work < num_chunks * rows; work += gridDim.x) {
    const int64_t t = work % rows, c = work / rows;
    const int64_t begin = c * kCudaDotsChunk;
    const int64_t end = begin + kCudaDotsChunk < n ? begin + kCudaDotsChunk : n;
    for (int64_t j = 0; j < m; ++j) {
      double acc = 0;
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const double w = t < capacity ? widen<double>(W[t * n + i]) : static_cast<double>(anchor[i]);
        acc += w * static_cast<double>(vec[j * n + i]);
      }
      const double total = Reduce(reduce_storage).Sum(acc);
      if (threadIdx.x == 0) partials[(c * rows + t) * m + j] = total;
      __syncthreads();
    }
  }
}

__global__ void sum_chunks_kernel(const double* partials, int64_t num_chunks, int64_t width, double* out) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < width;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double total = 0;
    for (int64_t c = 0; c < num_chunks; ++c) total += partials[c * width + k];
    out[k] = total;
  }
}

at::Tensor trajectory_dots_cuda(const at::Tensor& snapshots, const at::Tensor& vectors,
                                const c10::optional<at::Tensor>& anchor) {
  constexpr const char* op = "trajectory_dots";
  check_snapshots(op, snapshots);
  check_vectors(op, vectors, snapshots);
  check_anchor(op, anchor, snapshots);
  const c10::cuda::CUDAGuard guard(snapshots.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor vec = vectors.contiguous();
  const int64_t capacity = snapshots.size(0), n = snapshots.size(1), m = vectors.size(0);
  const int64_t rows = capacity + (anchor.has_value() ? 1 : 0);
  at::Tensor out = at::zeros({rows, m}, snapshots.options().dtype(c10::kDouble));
  if (m == 0 || n == 0 || rows == 0) return out;
  const int64_t num_chunks = (n + kCudaDotsChunk - 1) / kCudaDotsChunk;
  at::Tensor partials = at::empty({num_chunks * rows * m}, snapshots.options().dtype(c10::kDouble));
  const float* a = anchor.has_value() ? anchor->data_ptr<float>() : nullptr;
  const int grid = grid_size(num_chunks * rows);
  dispatch_float(to_dtype(snapshots.scalar_type(), op, "snapshots"), [&](auto stag) {
    using S = typename decltype(stag)::type;
    if constexpr (!std::is_same_v<S, double>) {
      const S* W = static_cast<const S*>(snapshots.data_ptr());
      if (vec.scalar_type() == c10::kDouble) {
        dots_kernel<S, double><<<grid, kThreads, 0, stream>>>(W, capacity, n, vec.data_ptr<double>(), m, a, num_chunks,
                                                              partials.data_ptr<double>());
      } else {
        dots_kernel<S, float><<<grid, kThreads, 0, stream>>>(W, capacity, n, vec.data_ptr<float>(), m, a, num_chunks,
                                                             partials.data_ptr<double>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  sum_chunks_kernel<<<grid_size((rows * m + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      partials.data_ptr<double>(), num_chunks, rows * m, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CUDA, m) {
  m.impl("trajectory_ingest", &trajectory_ingest_cuda);
  m.impl("trajectory_combine", &trajectory_combine_cuda);
  m.impl("trajectory_dots", &trajectory_dots_cuda);
}

}  // namespace koopfast
