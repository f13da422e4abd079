#include "codes/codes_args.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "common/checks.h"

namespace koopfast {
namespace {

bool is_sign_dtype(c10::ScalarType t) {
  return t == c10::kHalf || t == c10::kBFloat16 || t == c10::kFloat || t == c10::kDouble || t == c10::kBool;
}

}  // namespace

SignCodesInput prepare_sign_codes(const char* op, const at::Tensor& x, int64_t dim) {
  KF_CHECK_TYPE(is_sign_dtype(x.scalar_type()), op,
                "expected x to be float16, bfloat16, float32, float64 or bool, got ", x.scalar_type());
  const int64_t nd = x.dim();
  KF_CHECK_VALUE(nd >= 1, op, "expected x to have at least one dimension (the units), got a 0-dim tensor");
  KF_CHECK_VALUE(dim >= -nd && dim < nd, op, "expected dim in [", -nd, ", ", nd - 1, "] for x of shape ", x.sizes(),
                 ", got ", dim);
  if (dim < 0) dim += nd;
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  for (int64_t d = dim + 1; d < nd; ++d) inner *= x.size(d);
  SignCodesInput in;
  in.dtype = x.scalar_type();
  // A view whenever the strides allow it (contiguous, channels_last, sliced batches); else a copy.
  in.keep_alive = x.reshape({outer, x.size(dim), inner});
  const at::Tensor& v = in.keep_alive;
  in.view.data = v.data_ptr();
  in.view.outer = outer;
  in.view.units = x.size(dim);
  in.view.inner = inner;
  in.view.outer_stride = v.stride(0);
  in.view.unit_stride = v.stride(1);
  in.view.inner_stride = v.stride(2);
  return in;
}

at::Tensor empty_codes(const SignCodesInput& in, const at::Tensor& x) {
  return at::empty({in.view.units, words_for_bits(in.view.bits())}, x.options().dtype(c10::kLong));
}

CodeMatrix code_matrix(const char* op, const at::Tensor& t, const char* arg, int64_t index) {
  const std::string name = index >= 0 ? std::string(arg) + "[" + std::to_string(index) + "]" : std::string(arg);
  KF_CHECK_TYPE(t.scalar_type() == c10::kLong, op, "expected ", name, " to be int64 codes, got ", t.scalar_type());
  KF_CHECK_VALUE(t.dim() == 2, op, "expected ", name, " to be 2-D codes [units, words], got shape ", t.sizes());
  CodeMatrix m;
  m.data = t.data_ptr<int64_t>();
  m.rows = t.size(0);
  m.words = t.size(1);
  m.row_stride = t.stride(0);
  m.word_stride = t.stride(1);
  return m;
}

HammingInputs prepare_hamming(const char* op, at::TensorList a, at::TensorList b) {
  KF_CHECK_VALUE(!a.empty(), op, "expected a to be a non-empty list of code tensors, got an empty list");
  KF_CHECK_VALUE(b.empty() || b.size() == a.size(), op, "expected b to be empty or to hold one tensor per tensor of a (",
                 a.size(), "), got ", b.size());
  const c10::Device device = a[0].device();
  HammingInputs in;
  for (size_t i = 0; i < a.size(); ++i) {
    KF_CHECK_VALUE(a[i].device() == device, op, "expected all tensors on one device, got a[0] on ", device, " and a[", i,
                   "] on ", a[i].device());
    in.a.push_back(code_matrix(op, a[i], "a", static_cast<int64_t>(i)));
    if (b.empty()) continue;
    KF_CHECK_VALUE(b[i].device() == device, op, "expected all tensors on one device, got a[0] on ", device, " and b[", i,
                   "] on ", b[i].device());
    in.b.push_back(code_matrix(op, b[i], "b", static_cast<int64_t>(i)));
    KF_CHECK_VALUE(b[i].sizes() == a[i].sizes(), op, "expected b[", i, "] to have the shape of a[", i, "] ", a[i].sizes(),
                   ", got ", b[i].sizes());
  }
  return in;
}

// ---- devices without a kernel, and calls without any tensor -----------------------------------------
// The dispatcher routes both here (see csrc/select/select_args.cpp): fail with the reason.
namespace {

[[noreturn]] void no_kernel(const char* op, const at::Tensor& t) { no_kernel_for(op, t.device()); }

at::Tensor sign_codes_no_kernel(const at::Tensor& x, int64_t) { no_kernel("sign_codes", x); }

std::vector<at::Tensor> hamming_distance_no_kernel(at::TensorList a, at::TensorList b) {
  KF_CHECK_VALUE(!a.empty(), "hamming_distance", "expected a to be a non-empty list of code tensors, got an empty list");
  no_kernel("hamming_distance", a[0]);
}

at::Tensor pairwise_hamming_no_kernel(const at::Tensor& codes) { no_kernel("pairwise_hamming", codes); }

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CompositeExplicitAutograd, m) {
  m.impl("sign_codes", &sign_codes_no_kernel);
  m.impl("hamming_distance", &hamming_distance_no_kernel);
  m.impl("pairwise_hamming", &pairwise_hamming_no_kernel);
}

}  // namespace koopfast
