// Validation and preparation of the select ops' arguments, shared by the CPU and CUDA bindings.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <string_view>
#include <vector>

#include "common/tensor_view.h"
#include "select/select.h"

namespace koopfast {

struct SelectInputs {
  std::vector<TensorView> a;
  std::vector<TensorView> b;  // empty for unary scores
  ScoreKind kind = ScoreKind::Value;
  bool wide = false;          // compute scores in float64 (some input is float64)
  int64_t total = 0;          // elements over all tensors
  std::vector<at::Tensor> keep_alive;
};

// Checks a (non-empty, floating, one device), b (empty for unary scores; else one tensor per a
// entry with the same shape and dtype) and the score name, and builds the kernel views.
SelectInputs prepare_select_inputs(const char* op, at::TensorList a, at::TensorList b, std::string_view score);

// The counts in a stats tensor (layout: SelectStat), read to the host.
struct ThresholdStats {
  int64_t n_greater = 0;
  int64_t n_equal = 0;
  int64_t ties_kept = 0;

  bool keep_all_ties() const { return ties_kept == n_equal; }
};

// Checks the threshold/stats pair produced by select_threshold against the inputs, and the stats'
// values (NaN-free, 0 <= ties kept <= ties), on every backend alike. Stats on a device are read
// with one small copy to the host (a synchronization; koopfast.masks reads the NaN entry between
// select_threshold and topk_mask anyway).
ThresholdStats check_threshold_args(const char* op, const SelectInputs& in, const at::Tensor& a0,
                                    const at::Tensor& threshold, const at::Tensor& stats);

// select_threshold's k: 1 <= k <= the number of elements of a (which must hold at least one).
void check_select_k(const char* op, const SelectInputs& in, int64_t k);

// The per-tensor k of select_threshold_per_tensor: one per tensor of a, k[t] in [0, numel(a[t])].
std::vector<int64_t> check_per_tensor_k(const char* op, const SelectInputs& in, at::IntArrayRef k);

// Checks the thresholds [T] / stats [T, 4] pair produced by select_threshold_per_tensor.
void check_per_tensor_threshold_args(const char* op, const SelectInputs& in, const at::Tensor& a0,
                                     const at::Tensor& thresholds, const at::Tensor& stats);

// Checks one stats row (host memory) before masks are written from it: NaN-free, 0 <= ties kept
// <= ties. row_index < 0 for select_threshold's single row, else the row's index in messages.
void check_mask_stats(const char* op, const int64_t* row, int64_t row_index);

}  // namespace koopfast
