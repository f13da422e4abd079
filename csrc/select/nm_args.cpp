#include "select/nm_args.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"

namespace koopfast {

NmInputs prepare_nm_inputs(const char* op, at::TensorList a, at::TensorList b, std::string_view score, int64_t n,
                           int64_t m) {
  KF_CHECK_VALUE(m >= 1 && m <= kMaxNmGroup, op, "expected m (the group size) in [1, ", kMaxNmGroup, "], got ", m);
  KF_CHECK_VALUE(n >= 0 && n <= m, op, "expected n (kept per group) in [0, m = ", m, "], got ", n);
  for (size_t i = 0; i < a.size(); ++i) {
    KF_CHECK_VALUE(a[i].dim() == 2, op, "expected a[", i, "] to be 2-D [rows, cols] (groups run along cols), got ",
                   a[i].dim(), "-D shape ", a[i].sizes());
  }
  NmInputs in;
  in.scores = prepare_select_inputs(op, a, b, score);
  in.n = n;
  in.m = m;
  for (const auto& t : a) {
    in.rows.push_back(t.size(0));
    in.cols.push_back(t.size(1));
  }
  return in;
}

std::vector<at::Tensor> empty_nm_masks(const NmInputs& in, const at::Tensor& a0) {
  std::vector<at::Tensor> out;
  out.reserve(in.rows.size());
  for (size_t i = 0; i < in.rows.size(); ++i) {
    out.push_back(at::empty({in.rows[i], in.cols[i]}, a0.options().dtype(c10::kBool)));
  }
  return out;
}

namespace {

std::tuple<std::vector<at::Tensor>, at::Tensor> nm_masks_no_kernel(at::TensorList a, at::TensorList, std::string_view,
                                                                   int64_t, int64_t) {
  KF_CHECK_VALUE(!a.empty(), "nm_masks", "expected a to be a non-empty list of tensors, got an empty list");
  no_kernel_for("nm_masks", a[0].device());
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CompositeExplicitAutograd, m) { m.impl("nm_masks", &nm_masks_no_kernel); }

}  // namespace koopfast
