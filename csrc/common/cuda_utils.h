// Helpers for the CUDA bindings: device-side copies of tensor lists and chunk tables, launch sizes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <vector>

#include "common/chunks.h"
#include "common/tensor_view.h"

namespace koopfast {

// Tensor views, chunks and output pointers on the device: a kernel parameter (trivially copyable).
struct DeviceTable {
  const TensorView* a = nullptr;
  const TensorView* b = nullptr;  // equals a for unary scores
  const Chunk* chunks = nullptr;
  void* const* out = nullptr;     // per-tensor output pointers, if any were given
  int64_t num_chunks = 0;
};

// A DeviceTable and the device memory it points into (keep `storage` alive while kernels run).
struct UploadedTable {
  at::Tensor storage;
  DeviceTable table;
};

// Copies the views, chunks and output pointers to `device` in one asynchronous transfer.
UploadedTable upload_table(const std::vector<TensorView>& a, const std::vector<TensorView>& b,
                         const std::vector<Chunk>& chunks, const std::vector<void*>& out, c10::Device device);

// Blocks for a grid-stride loop over `work` items: enough to fill the device, no more than needed.
int grid_size(int64_t work, int blocks_per_sm = 8);

}  // namespace koopfast
