// Validation and preparation of the mask ops' arguments, shared by the CPU and CUDA bindings.
//
// Every op works on a list of tensors; the kernels walk fixed-size chunks of *logical* elements
// (common/chunks.h), so a packed mask and the tensor it belongs to are chunked alike.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "common/tensor_view.h"
#include "masks/masks.h"

namespace koopfast {

struct MaskLists {
  std::vector<TensorView> a;       // the op's main list (masks, packed masks or targets)
  std::vector<TensorView> b;       // apply_masks: the mask of each target; else empty
  std::vector<int64_t> numels;     // logical elements of each entry of a (the chunking)
  std::vector<at::Tensor> keep_alive;
  int64_t total = 0;
};

// pack_masks: bool tensors of any shapes and strides, on one device.
MaskLists prepare_pack(const char* op, at::TensorList masks);

// unpack_masks: 1-D uint8 tensors of ceil(numels[i] / 8) bytes, on one device.
MaskLists prepare_unpack(const char* op, at::TensorList packed, at::IntArrayRef numels);

// count_masks: bool masks of numels[i] elements, or packed masks of numels[i] bits.
MaskLists prepare_count(const char* op, at::TensorList masks, at::IntArrayRef numels);

// apply_masks: floating targets (no internal overlap, not overlapping each other) and, for each,
// masks[mask_index[i]]: bool with the target's shape, or packed with ceil(numel / 8) bytes.
MaskLists prepare_apply(const char* op, at::TensorList targets, at::TensorList masks, at::IntArrayRef mask_index);

}  // namespace koopfast
