#include "trajectory/trajectory_args.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/view_as_real.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/views.h"

namespace koopfast {

void check_snapshots(const char* op, const at::Tensor& snapshots) {
  KF_CHECK_VALUE(snapshots.dim() == 2, op, "expected snapshots to be a 2-dim [capacity, N] tensor, got shape ",
                 snapshots.sizes());
  const auto t = snapshots.scalar_type();
  KF_CHECK_TYPE(t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf, op,
                "expected snapshots to be float32, bfloat16 or float16, got ", t);
  KF_CHECK_VALUE(snapshots.is_contiguous(), op, "expected snapshots to be contiguous, got strides ",
                 snapshots.strides());
}

void check_anchor(const char* op, const c10::optional<at::Tensor>& anchor, const at::Tensor& snapshots) {
  if (!anchor.has_value()) return;
  const at::Tensor& a = *anchor;
  KF_CHECK_VALUE(a.dim() == 1 && a.size(0) == snapshots.size(1), op, "expected anchor to have shape [",
                 snapshots.size(1), "], got ", a.sizes());
  KF_CHECK_TYPE(a.scalar_type() == c10::kFloat, op, "expected anchor to be float32, got ", a.scalar_type());
  KF_CHECK_VALUE(a.is_contiguous(), op, "expected anchor to be contiguous");
  KF_CHECK_VALUE(a.device() == snapshots.device(), op, "expected anchor on ", snapshots.device(), ", got ",
                 a.device());
}

IngestInputs prepare_ingest(const char* op, at::TensorList params, const at::Tensor& snapshots, int64_t slot,
                            at::IntArrayRef dot_slots, const c10::optional<at::Tensor>& anchor) {
  check_snapshots(op, snapshots);
  check_anchor(op, anchor, snapshots);
  const int64_t capacity = snapshots.size(0);
  IngestInputs in;
  KF_CHECK_VALUE(!params.empty(), op, "expected params to be a non-empty list of tensors, got an empty list");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto t = params[i].scalar_type();
    KF_CHECK_TYPE(t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf || t == c10::kDouble, op,
                  "expected params[", i, "] to be a floating-point tensor, got ", t);
    KF_CHECK_VALUE(params[i].device() == snapshots.device(), op, "expected params[", i, "] on ", snapshots.device(),
                   " (the snapshots' device), got ", params[i].device());
    in.offsets.push_back(in.n);
    in.n += params[i].numel();
    in.params.push_back(make_view(params[i], op, "params", in.keep_alive));
  }
  KF_CHECK_VALUE(in.n == snapshots.size(1), op, "expected params holding ", snapshots.size(1),
                 " elements in all (a snapshot row), got ", in.n);
  KF_CHECK_VALUE(slot >= 0 && slot < capacity, op, "expected slot in [0, ", capacity, "), got ", slot);
  for (int64_t s : dot_slots) {
    KF_CHECK_VALUE(s >= 0 && s < capacity && s != slot, op, "expected dot_slots in [0, ", capacity,
                   ") and different from slot ", slot, ", got ", s);
  }
  in.slot = slot;
  in.dot_slots.assign(dot_slots.begin(), dot_slots.end());
  return in;
}

void check_coeffs(const char* op, const at::Tensor& coeffs, const at::Tensor& snapshots) {
  KF_CHECK_VALUE(coeffs.dim() == 2 && coeffs.size(0) == snapshots.size(0), op,
                 "expected coeffs to have shape [capacity = ", snapshots.size(0), ", m], got ", coeffs.sizes());
  KF_CHECK_TYPE(coeffs.scalar_type() == c10::kDouble || coeffs.scalar_type() == c10::kComplexDouble, op,
                "expected coeffs to be float64 or complex128, got ", coeffs.scalar_type());
  KF_CHECK_VALUE(coeffs.device() == snapshots.device(), op, "expected coeffs on ", snapshots.device(), ", got ",
                 coeffs.device());
}

void check_vectors(const char* op, const at::Tensor& vectors, const at::Tensor& snapshots) {
  KF_CHECK_VALUE(vectors.dim() == 2 && vectors.size(1) == snapshots.size(1), op,
                 "expected vectors to have shape [m, N = ", snapshots.size(1), "], got ", vectors.sizes());
  KF_CHECK_TYPE(vectors.scalar_type() == c10::kFloat || vectors.scalar_type() == c10::kDouble, op,
                "expected vectors to be float32 or float64, got ", vectors.scalar_type());
  KF_CHECK_VALUE(vectors.device() == snapshots.device(), op, "expected vectors on ", snapshots.device(), ", got ",
                 vectors.device());
}

CombineInputs prepare_combine(const char* op, const at::Tensor& snapshots, const at::Tensor& coeffs,
                              const c10::optional<at::Tensor>& anchor, bool wide) {
  check_snapshots(op, snapshots);
  check_coeffs(op, coeffs, snapshots);
  check_anchor(op, anchor, snapshots);
  CombineInputs in;
  const bool complex = coeffs.is_complex();
  in.per = complex ? 2 : 1;
  in.capacity = snapshots.size(0);
  in.n = snapshots.size(1);
  in.m = coeffs.size(1);
  in.cols = in.m * in.per;
  in.coef = (complex ? at::view_as_real(coeffs.contiguous()) : coeffs).contiguous().view({in.capacity, in.cols});
  const c10::ScalarType out_type =
      complex ? (wide ? c10::kComplexDouble : c10::kComplexFloat) : (wide ? c10::kDouble : c10::kFloat);
  in.out = at::empty({in.m, in.n}, snapshots.options().dtype(out_type));
  return in;
}

DotsInputs prepare_dots(const char* op, const at::Tensor& snapshots, const at::Tensor& vectors,
                        const c10::optional<at::Tensor>& anchor) {
  check_snapshots(op, snapshots);
  check_vectors(op, vectors, snapshots);
  check_anchor(op, anchor, snapshots);
  DotsInputs in;
  in.vec = vectors.contiguous();
  in.capacity = snapshots.size(0);
  in.n = snapshots.size(1);
  in.m = vectors.size(0);
  in.rows = in.capacity + (anchor.has_value() ? 1 : 0);
  in.out = at::zeros({in.rows, in.m}, snapshots.options().dtype(c10::kDouble));
  return in;
}

// Devices without a kernel: a clear error instead of a dispatcher dump.
namespace {

[[noreturn]] void no_kernel(const char* op, const at::Tensor& snapshots) { no_kernel_for(op, snapshots.device()); }

std::tuple<at::Tensor, at::Tensor> ingest_no_kernel(at::TensorList, at::Tensor& snapshots, int64_t, at::IntArrayRef,
                                                    const c10::optional<at::Tensor>&) {
  no_kernel("trajectory_ingest", snapshots);
}
at::Tensor combine_no_kernel(const at::Tensor& snapshots, const at::Tensor&, const c10::optional<at::Tensor>&, bool) {
  no_kernel("trajectory_combine", snapshots);
}
at::Tensor dots_no_kernel(const at::Tensor& snapshots, const at::Tensor&, const c10::optional<at::Tensor>&) {
  no_kernel("trajectory_dots", snapshots);
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CompositeExplicitAutograd, m) {
  m.impl("trajectory_ingest", &ingest_no_kernel);
  m.impl("trajectory_combine", &combine_no_kernel);
  m.impl("trajectory_dots", &dots_no_kernel);
}

}  // namespace koopfast
