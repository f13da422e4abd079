// Validation of the trajectory ops' arguments, shared by the CPU and CUDA bindings.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "common/tensor_view.h"

namespace koopfast {

struct IngestInputs {
  std::vector<TensorView> params;
  std::vector<int64_t> offsets;  // first flat index of each parameter in a snapshot row
  int64_t n = 0;                 // elements per snapshot
  int64_t slot = 0;
  std::vector<int64_t> dot_slots;
  std::vector<at::Tensor> keep_alive;
};

// Checks the snapshot buffer ([capacity, N], contiguous, float32/bfloat16/float16).
void check_snapshots(const char* op, const at::Tensor& snapshots);
// Checks an optional anchor (float32 [N], contiguous, on the buffer's device).
void check_anchor(const char* op, const c10::optional<at::Tensor>& anchor, const at::Tensor& snapshots);

IngestInputs prepare_ingest(const char* op, at::TensorList params, const at::Tensor& snapshots, int64_t slot,
                            at::IntArrayRef dot_slots, const c10::optional<at::Tensor>& anchor);

// coeffs: [capacity, m], float64 or complex128, on the buffer's device.
void check_coeffs(const char* op, const at::Tensor& coeffs, const at::Tensor& snapshots);
// vectors: [m, N], float32 or float64, contiguous, on the buffer's device.
void check_vectors(const char* op, const at::Tensor& vectors, const at::Tensor& snapshots);

// trajectory_combine's checked arguments and its (uninitialized) output.
struct CombineInputs {
  at::Tensor coef;  // float64 [capacity, cols], contiguous: complex coefficients as (re, im) pairs
  at::Tensor out;   // [m, N]: float32/float64, or complex64/complex128 for complex coefficients
  int64_t capacity = 0, n = 0, m = 0;
  int per = 1;       // output reals per coefficient column: 1, or 2 for complex
  int64_t cols = 0;  // m * per
  bool empty() const { return m == 0 || n == 0; }
};
CombineInputs prepare_combine(const char* op, const at::Tensor& snapshots, const at::Tensor& coeffs,
                              const c10::optional<at::Tensor>& anchor, bool wide);

// trajectory_dots's checked arguments and its zero-filled output [capacity (+ 1 with an anchor), m].
struct DotsInputs {
  at::Tensor vec;  // vectors, contiguous
  at::Tensor out;
  int64_t capacity = 0, n = 0, m = 0, rows = 0;
  bool empty() const { return m == 0 || n == 0 || rows == 0; }
};
DotsInputs prepare_dots(const char* op, const at::Tensor& snapshots, const at::Tensor& vectors,
                        const c10::optional<at::Tensor>& anchor);

}  // namespace koopfast
