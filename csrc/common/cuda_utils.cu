#include "common/cuda_utils.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

namespace koopfast {

UploadedTable upload_table(const std::vector<TensorView>& a, const std::vector<TensorView>& b,
                         const std::vector<Chunk>& chunks, const std::vector<void*>& out, c10::Device device) {
  static_assert(sizeof(TensorView) % 8 == 0 && sizeof(Chunk) % 8 == 0, "8-byte aligned sections");
  const size_t a_bytes = a.size() * sizeof(TensorView);
  const size_t b_bytes = b.size() * sizeof(TensorView);
  const size_t c_bytes = chunks.size() * sizeof(Chunk);
  const size_t o_bytes = out.size() * sizeof(void*);
  const size_t total = a_bytes + b_bytes + c_bytes + o_bytes;
  // Pinned staging and a non-blocking copy_: asynchronous, and torch's caching host allocator keeps
  // the staging buffer alive until the copy on the current stream has completed.
  at::Tensor host = at::empty({static_cast<int64_t>(std::max<size_t>(total, 8))},
                              at::TensorOptions().dtype(c10::kByte).pinned_memory(true));
  auto* p = static_cast<char*>(host.data_ptr());
  std::memcpy(p, a.data(), a_bytes);
  std::memcpy(p + a_bytes, b.data(), b_bytes);
  std::memcpy(p + a_bytes + b_bytes, chunks.data(), c_bytes);
  std::memcpy(p + a_bytes + b_bytes + c_bytes, out.data(), o_bytes);
  UploadedTable up;
  up.storage = at::empty({host.numel()}, at::TensorOptions().dtype(c10::kByte).device(device));
  up.storage.copy_(host, /*non_blocking=*/true);
  auto* d = static_cast<char*>(up.storage.data_ptr());
  DeviceTable& t = up.table;
  t.a = reinterpret_cast<const TensorView*>(d);
  t.b = b.empty() ? t.a : reinterpret_cast<const TensorView*>(d + a_bytes);
  t.chunks = reinterpret_cast<const Chunk*>(d + a_bytes + b_bytes);
  t.out = out.empty() ? nullptr : reinterpret_cast<void* const*>(d + a_bytes + b_bytes + c_bytes);
  t.num_chunks = static_cast<int64_t>(chunks.size());
  return up;
}

int grid_size(int64_t work, int blocks_per_sm) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));  // a cheap driver query
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, static_cast<int64_t>(sms) * blocks_per_sm)));
}

}  // namespace koopfast
