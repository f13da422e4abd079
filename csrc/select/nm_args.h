// Validation of the N:M mask op's arguments, shared by the CPU and CUDA bindings.
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>
#include <vector>

#include "select/select_args.h"

namespace koopfast {

struct NmInputs {
  SelectInputs scores;        // a (and b for binary scores), as the selection ops take them
  std::vector<int64_t> rows;  // per tensor: a[i] is [rows, cols]
  std::vector<int64_t> cols;
  int64_t n = 0;
  int64_t m = 0;
};

// Checks a/b/score as select_threshold does, plus: every a[i] 2-D, 1 <= m <= kMaxNmGroup,
// 0 <= n <= m.
NmInputs prepare_nm_inputs(const char* op, at::TensorList a, at::TensorList b, std::string_view score, int64_t n,
                           int64_t m);

// The output masks: bool [rows, cols], contiguous, on a's device.
std::vector<at::Tensor> empty_nm_masks(const NmInputs& in, const at::Tensor& a0);

constexpr int64_t kMaxNmGroup = 1024;

}  // namespace koopfast
