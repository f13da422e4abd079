#include "select/select_args.h"

#include <string>

#include "common/checks.h"
#include "common/views.h"

#include <torch/library.h>

namespace koopfast {
namespace {

ScoreKind parse_score(const char* op, std::string_view s) {
  if (s == "value") return ScoreKind::Value;
  if (s == "abs") return ScoreKind::Abs;
  if (s == "product") return ScoreKind::Product;
  if (s == "abs_product") return ScoreKind::AbsProduct;
  if (s == "square_times_abs") return ScoreKind::SquareTimesAbs;
  KF_CHECK_VALUE(false, op,
                 "expected score to be one of 'value', 'abs', 'product', 'abs_product', 'square_times_abs', got '",
                 std::string(s), "'");
  return ScoreKind::Value;
}


}  // namespace

SelectInputs prepare_select_inputs(const char* op, at::TensorList a, at::TensorList b, std::string_view score) {
  SelectInputs in;
  in.kind = parse_score(op, score);
  KF_CHECK_VALUE(!a.empty(), op, "expected a to be a non-empty list of tensors, got an empty list");
  const bool binary = score_is_binary(in.kind);
  if (binary) {
    KF_CHECK_VALUE(b.size() == a.size(), op, "expected b to hold one tensor per tensor of a (", a.size(),
                   ") for score '", std::string(score), "', got ", b.size());
  } else {
    KF_CHECK_VALUE(b.empty(), op, "expected b to be empty for the unary score '", std::string(score), "', got ",
                   b.size(), " tensors");
  }
  const c10::Device device = a[0].device();
  for (size_t i = 0; i < a.size(); ++i) {
    KF_CHECK_TYPE(is_floating(a[i].scalar_type()), op, "expected a[", i,
                  "] to be float16, bfloat16, float32 or float64, got ", a[i].scalar_type());
    KF_CHECK_VALUE(a[i].device() == device, op, "expected all tensors on one device, got a[0] on ", device, " and a[",
                   i, "] on ", a[i].device());
    in.wide = in.wide || a[i].scalar_type() == c10::kDouble;
    in.total += a[i].numel();
    in.a.push_back(make_view(a[i], op, "a", in.keep_alive));
    if (binary) {
      KF_CHECK_VALUE(b[i].device() == device, op, "expected all tensors on one device, got a[0] on ", device,
                     " and b[", i, "] on ", b[i].device());
      KF_CHECK_VALUE(b[i].sizes() == a[i].sizes(), op, "expected b[", i, "] to have the shape of a[", i, "] ",
                     a[i].sizes(), ", got ", b[i].sizes());
      KF_CHECK_TYPE(b[i].scalar_type() == a[i].scalar_type(), op, "expected b[", i, "] to have the dtype of a[", i,
                    "] (", a[i].scalar_type(), "), got ", b[i].scalar_type());
      in.b.push_back(make_view(b[i], op, "b", in.keep_alive));
    }
  }
  return in;
}

ThresholdStats check_threshold_args(const char* op, const SelectInputs& in, const at::Tensor& a0,
                                    const at::Tensor& threshold, const at::Tensor& stats) {
  const auto want = in.wide ? c10::kDouble : c10::kFloat;
  KF_CHECK_VALUE(threshold.dim() == 0, op, "expected threshold to be a 0-dim tensor, got shape ", threshold.sizes());
  KF_CHECK_TYPE(threshold.scalar_type() == want, op, "expected threshold to be ", want,
                " (the compute dtype of these inputs), got ", threshold.scalar_type());
  KF_CHECK_VALUE(stats.dim() == 1 && stats.size(0) == kNumSelectStats, op, "expected stats to have shape [",
                 int{kNumSelectStats}, "], got ", stats.sizes());
  KF_CHECK_TYPE(stats.scalar_type() == c10::kLong, op, "expected stats to be int64, got ", stats.scalar_type());
  KF_CHECK_VALUE(threshold.device() == a0.device() && stats.device() == a0.device(), op,
                 "expected threshold and stats on ", a0.device(), ", got ", threshold.device(), " and ",
                 stats.device());
  const at::Tensor host = stats.is_cpu() ? stats : stats.to(c10::kCPU);
  const at::Tensor values = host.contiguous();
  const int64_t* st = values.data_ptr<int64_t>();
  check_mask_stats(op, st, -1);
  return {st[kNumGreater], st[kNumEqual], st[kNumTiesKept]};
}

void check_select_k(const char* op, const SelectInputs& in, int64_t k) {
  KF_CHECK_VALUE(in.total > 0, op, "expected at least one element in a, got only empty tensors");
  KF_CHECK_VALUE(k >= 1 && k <= in.total, op, "expected k in [1, ", in.total, "] (the number of elements), got ", k);
}

std::vector<int64_t> check_per_tensor_k(const char* op, const SelectInputs& in, at::IntArrayRef k) {
  KF_CHECK_VALUE(k.size() == in.a.size(), op, "expected k to hold one count per tensor of a (", in.a.size(),
                 "), got ", k.size());
  for (size_t t = 0; t < k.size(); ++t) {
    KF_CHECK_VALUE(k[t] >= 0 && k[t] <= in.a[t].numel, op, "expected k[", t, "] in [0, ", in.a[t].numel,
                   "] (the number of elements of a[", t, "]), got ", k[t]);
  }
  return k.vec();
}

void check_per_tensor_threshold_args(const char* op, const SelectInputs& in, const at::Tensor& a0,
                                     const at::Tensor& thresholds, const at::Tensor& stats) {
  const auto want = in.wide ? c10::kDouble : c10::kFloat;
  const int64_t n = static_cast<int64_t>(in.a.size());
  KF_CHECK_VALUE(thresholds.dim() == 1 && thresholds.size(0) == n, op, "expected thresholds to have shape [", n,
                 "] (one per tensor of a), got ", thresholds.sizes());
  KF_CHECK_TYPE(thresholds.scalar_type() == want, op, "expected thresholds to be ", want,
                " (the compute dtype of these inputs), got ", thresholds.scalar_type());
  KF_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == kNumSelectStats, op,
                 "expected stats to have shape [", n, ", ", int{kNumSelectStats}, "], got ", stats.sizes());
  KF_CHECK_TYPE(stats.scalar_type() == c10::kLong, op, "expected stats to be int64, got ", stats.scalar_type());
  KF_CHECK_VALUE(thresholds.device() == a0.device() && stats.device() == a0.device(), op,
                 "expected thresholds and stats on ", a0.device(), ", got ", thresholds.device(), " and ",
                 stats.device());
}

void check_mask_stats(const char* op, const int64_t* row, int64_t row_index) {
  const std::string where = row_index < 0 ? std::string("stats") : "stats[" + std::to_string(row_index) + "]";
  KF_CHECK_VALUE(row[kNanTensor] < 0, op, "expected ", where, " of NaN-free scores, got ", where,
                 " reporting NaN in a[", row_index < 0 ? row[kNanTensor] : row_index, "]");
  KF_CHECK_VALUE(row[kNumTiesKept] >= 0 && row[kNumTiesKept] <= row[kNumEqual], op, "expected ", where,
                 " with 0 <= ties kept <= ties, got ", row[kNumTiesKept], " and ", row[kNumEqual]);
}

// ---- devices without a kernel, and calls without any tensor -----------------------------------------
// The dispatcher routes both here (CompositeExplicitAutograd covers every backend key without a
// kernel of its own, and the no-tensor case). Fail with the reason instead of a dispatcher dump.
namespace {

[[noreturn]] void no_kernel(const char* op, at::TensorList a) {
  KF_CHECK_VALUE(!a.empty(), op, "expected a to be a non-empty list of tensors, got an empty list");
  no_kernel_for(op, a[0].device());
}

std::tuple<at::Tensor, at::Tensor> select_threshold_no_kernel(at::TensorList a, at::TensorList, std::string_view,
                                                              int64_t) {
  no_kernel("select_threshold", a);
}

std::vector<at::Tensor> topk_mask_no_kernel(at::TensorList a, at::TensorList, std::string_view, const at::Tensor&,
                                            const at::Tensor&) {
  no_kernel("topk_mask", a);
}

std::tuple<at::Tensor, at::Tensor> select_threshold_per_tensor_no_kernel(at::TensorList a, at::TensorList,
                                                                         std::string_view, at::IntArrayRef) {
  no_kernel("select_threshold_per_tensor", a);
}

std::vector<at::Tensor> topk_mask_per_tensor_no_kernel(at::TensorList a, at::TensorList, std::string_view,
                                                       const at::Tensor&, const at::Tensor&) {
  no_kernel("topk_mask_per_tensor", a);
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CompositeExplicitAutograd, m) {
  m.impl("select_threshold", &select_threshold_no_kernel);
  m.impl("topk_mask", &topk_mask_no_kernel);
  m.impl("select_threshold_per_tensor", &select_threshold_per_tensor_no_kernel);
  m.impl("topk_mask_per_tensor", &topk_mask_per_tensor_no_kernel);
}

}  // namespace koopfast
