// at::Tensor -> TensorView: the boundary between the torch-aware bindings and torch-free kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "common/tensor_view.h"

namespace koopfast {

// Throws TypeError (naming op and arg) for dtypes outside the DType enum.
DType to_dtype(c10::ScalarType t, const char* op, const char* arg);

// A view of `t` with dimensions coalesced. Tensors needing more than kMaxDims strided dimensions
// are copied to contiguous memory first; the copy is appended to `keep_alive`.
TensorView make_view(const at::Tensor& t, const char* op, const char* arg, std::vector<at::Tensor>& keep_alive);

}  // namespace koopfast
