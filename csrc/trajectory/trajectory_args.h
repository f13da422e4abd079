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

}  // namespace koopfast
