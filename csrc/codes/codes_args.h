// Validation and preparation of the codes ops' arguments, shared by the CPU and CUDA bindings.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "codes/codes.h"

namespace koopfast {

struct SignCodesInput {
  SignInput view;
  c10::ScalarType dtype = c10::kFloat;
  at::Tensor keep_alive;  // x, or the copy that reshape made
};

// Checks x (floating or bool, at least 1-D) and dim, and views x as [outer, units, inner].
SignCodesInput prepare_sign_codes(const char* op, const at::Tensor& x, int64_t dim);

// The empty int64 code tensor [units, words] for a prepared input, on x's device.
at::Tensor empty_codes(const SignCodesInput& in, const at::Tensor& x);

// Checks one code tensor (int64, 2-D) named `arg` (index >= 0: arg[index]) and describes it.
CodeMatrix code_matrix(const char* op, const at::Tensor& t, const char* arg, int64_t index = -1);

struct HammingInputs {
  std::vector<CodeMatrix> a;
  std::vector<CodeMatrix> b;  // empty: distance to all-zero codes (popcount)
};

// Checks a (non-empty list of code tensors on one device) and b (empty, or one tensor per a entry
// with its shape, on the same device).
HammingInputs prepare_hamming(const char* op, at::TensorList a, at::TensorList b);

}  // namespace koopfast
