// CUDA backend of nm_masks: one thread per group of m columns, one launch per tensor (the
// tensor's view travels as a kernel parameter). Scores are recomputed from global memory in the
// rank count (O(m^2) reads per group, served by L1 for the short groups N:M uses) and ranked
// exactly as on the CPU (select/nm.h), so masks are equal bit for bit on both backends.
//
// Verified: compiles and links (scripts/check_cuda_compiles.sh, check_cuda_build.sh). Not yet run
// on a GPU: tests/ops/test_nm.py compares it with the CPU kernel and the reference twin there.
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "common/cuda_utils.h"
#include "common/dispatch.h"
#include "select/nm.h"
#include "select/nm_args.h"

namespace koopfast {
namespace {

constexpr int kNmThreads = 256;

template <ScoreKind K, class C, class S>
__device__ C nm_score(const TensorView& a, const TensorView& b, int64_t flat) {
  const S* pa = static_cast<const S*>(a.data);
  const S* pb = static_cast<const S*>(b.data);
  return score_of<K, C>(widen<C>(pa[a.offset(flat)]), widen<C>(pb[b.offset(flat)]));
}

template <ScoreKind K, class C, class S>
__global__ void nm_kernel(TensorView a, TensorView b, int64_t rows, int64_t cols, int64_t n, int64_t m,
                          int tensor, bool* out, int* first_nan) {
  const int64_t per_row = (cols + m - 1) / m;
  const int64_t groups = rows * per_row;
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g < groups; g += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = g / per_row;
    const int64_t c0 = (g % per_row) * m;
    const int64_t len = cols - c0 < m ? cols - c0 : m;
    const int64_t keep = nm_group_keep(n, m, len);
    const int64_t base = r * cols + c0;
    bool nan = false;
    for (int64_t i = 0; i < len; ++i) nan |= isnan(nm_score<K, C, S>(a, b, base + i));
    if (nan) {
      atomicMin(first_nan, tensor);
      continue;
    }
    for (int64_t i = 0; i < len; ++i) {
      const C x = nm_score<K, C, S>(a, b, base + i);
      int64_t ahead = 0;
      for (int64_t j = 0; j < len; ++j) {
        const C y = nm_score<K, C, S>(a, b, base + j);
        ahead += (y > x) | ((y == x) & (j < i));
      }
      out[base + i] = ahead < keep;
    }
  }
}

// The first tensor with a NaN score (INT_MAX: none) as the op's int64 status (-1: none).
__global__ void nm_status_kernel(const int* first_nan, int64_t* status) {
  *status = *first_nan == INT_MAX ? -1 : *first_nan;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> nm_masks_cuda(at::TensorList a, at::TensorList b,
                                                              std::string_view score, int64_t n, int64_t m) {
  const NmInputs in = prepare_nm_inputs("nm_masks", a, b, score, n, m);
  const c10::cuda::CUDAGuard guard(a[0].device());
  std::vector<at::Tensor> out = empty_nm_masks(in, a[0]);
  at::Tensor first_nan = at::full({1}, INT_MAX, a[0].options().dtype(c10::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t t = 0; t < out.size(); ++t) {
    const int64_t groups = in.rows[t] * ((in.cols[t] + m - 1) / m);
    if (groups == 0) continue;
    const TensorView& va = in.scores.a[t];
    const TensorView& vb = in.scores.b.empty() ? va : in.scores.b[t];
    const int grid = grid_size(groups);
    dispatch_float(va.dtype, [&](auto stag) {
      using S = typename decltype(stag)::type;
      dispatch_score(in.scores.kind, [&](auto ktag) {
        constexpr ScoreKind K = decltype(ktag)::value;
        if (in.scores.wide) {
          nm_kernel<K, double, S><<<grid, kNmThreads, 0, stream>>>(va, vb, in.rows[t], in.cols[t], n, m,
                                                                  static_cast<int>(t), out[t].data_ptr<bool>(),
                                                                  first_nan.data_ptr<int>());
        } else {
          nm_kernel<K, float, S><<<grid, kNmThreads, 0, stream>>>(va, vb, in.rows[t], in.cols[t], n, m,
                                                                 static_cast<int>(t), out[t].data_ptr<bool>(),
                                                                 first_nan.data_ptr<int>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  at::Tensor status = at::empty({1}, a[0].options().dtype(c10::kLong));
  nm_status_kernel<<<1, 1, 0, stream>>>(first_nan.data_ptr<int>(), status.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CUDA, m) { m.impl("nm_masks", &nm_masks_cuda); }

}  // namespace koopfast
