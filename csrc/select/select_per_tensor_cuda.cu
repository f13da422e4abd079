// CUDA backend of the per-tensor select ops, composed from the CUDA select_threshold and
// topk_mask kernels (through the dispatcher): one launch sequence per tensor, no host
// synchronization. Simple on purpose: the same answers as the CPU backend (each tensor is
// selected alone, in the compute dtype of the whole list), not yet one segmented pass.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <string_view>
#include <tuple>
#include <vector>

#include "select/select_args.h"

namespace koopfast {
namespace {

using SelectFn = std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList, std::string_view, int64_t);
using MaskFn = std::vector<at::Tensor>(at::TensorList, at::TensorList, std::string_view, const at::Tensor&,
                                       const at::Tensor&);

// a[t] (and b[t]) alone, in the list's compute dtype (float64 if any tensor of the list is).
std::vector<at::Tensor> one(at::TensorList x, size_t t, bool wide) {
  if (x.empty()) return {};
  return {wide ? x[t].to(c10::kDouble) : x[t]};
}

std::tuple<at::Tensor, at::Tensor> select_threshold_per_tensor_cuda(at::TensorList a, at::TensorList b,
                                                                    std::string_view score, at::IntArrayRef k) {
  constexpr const char* op = "select_threshold_per_tensor";
  const auto in = prepare_select_inputs(op, a, b, score);
  const std::vector<int64_t> ks = check_per_tensor_k(op, in, k);
  c10::cuda::CUDAGuard guard(a[0].device());
  static const auto select =
      c10::Dispatcher::singleton().findSchemaOrThrow("koopfast::select_threshold", "").typed<SelectFn>();
  const auto dtype = in.wide ? c10::kDouble : c10::kFloat;
  const int64_t n = static_cast<int64_t>(a.size());
  const double inf = std::numeric_limits<double>::infinity();
  auto thresholds = at::full({n}, inf, a[0].options().dtype(dtype));
  auto stats = at::zeros({n, kNumSelectStats}, a[0].options().dtype(c10::kLong));
  stats.select(1, kNanTensor).fill_(-1);
  for (int64_t t = 0; t < n; ++t) {
    if (a[t].numel() == 0) continue;  // +inf, (0, 0, 0, -1)
    const auto at_ = one(a, t, in.wide);
    const auto bt = one(b, t, in.wide);
    auto [thr, st] = select.call(at_, bt, score, std::max<int64_t>(ks[t], 1));  // k = 0 still looks for NaN
    if (ks[t] == 0) {
      // The largest score is +inf exactly when +inf is the threshold of k = 1: then all of its ties.
      auto zero = at::zeros({}, st.options());
      auto nan = st[kNanTensor];
      auto has_nan = at::ge(nan, 0);
      auto equal = at::where(at::eq(thr, inf), st[kNumEqual], zero);
      thr = at::where(has_nan, thr, at::full({}, inf, thr.options()));
      st = at::stack({zero, at::where(has_nan, zero, equal), zero, nan});
    }
    thresholds[t].copy_(thr);
    stats[t].copy_(st);
  }
  return {thresholds, stats};
}

std::vector<at::Tensor> topk_mask_per_tensor_cuda(at::TensorList a, at::TensorList b, std::string_view score,
                                                  const at::Tensor& thresholds, const at::Tensor& stats) {
  constexpr const char* op = "topk_mask_per_tensor";
  const auto in = prepare_select_inputs(op, a, b, score);
  check_per_tensor_threshold_args(op, in, a[0], thresholds, stats);
  c10::cuda::CUDAGuard guard(a[0].device());
  static const auto mask = c10::Dispatcher::singleton().findSchemaOrThrow("koopfast::topk_mask", "").typed<MaskFn>();
  std::vector<at::Tensor> masks;
  masks.reserve(a.size());
  for (size_t t = 0; t < a.size(); ++t) {
    if (a[t].numel() == 0) {
      masks.push_back(at::empty(a[t].sizes(), a[t].options().dtype(c10::kBool)));
      continue;
    }
    const auto st = stats[static_cast<int64_t>(t)].contiguous();
    masks.push_back(mask.call(one(a, t, in.wide), one(b, t, in.wide), score, thresholds[static_cast<int64_t>(t)], st)[0]);
  }
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CUDA, m) {
  m.impl("select_threshold_per_tensor", &select_threshold_per_tensor_cuda);
  m.impl("topk_mask_per_tensor", &topk_mask_per_tensor_cuda);
}

}  // namespace koopfast
