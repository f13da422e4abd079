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

// Host arrays to copy to a device in one transfer: one section per array.
struct HostSection {
  const void* data = nullptr;
  size_t bytes = 0;
};

template <class T>
HostSection section_of(const std::vector<T>& v) {
  return {v.data(), v.size() * sizeof(T)};
}

// Device copies of `sections`, in one pinned staging buffer and one copy on the current stream
// (no host synchronization). Section i starts at `at[i]`, 16-byte aligned; keep `storage` alive
// while kernels read it (freeing it is stream-ordered, so returning it after the launch is safe).
struct UploadedSections {
  at::Tensor storage;
  std::vector<const char*> at;
};
UploadedSections upload_sections(const std::vector<HostSection>& sections, c10::Device device);

// Room for one TensorView in shared memory: TensorView's default member initializers rule out a
// plain __shared__ TensorView, this trivial wrapper does not. Kernels copy the views of the chunk
// at hand into it once per chunk, so element loops read their metadata from shared memory.
struct alignas(alignof(TensorView)) SharedView {
  unsigned char bytes[sizeof(TensorView)];
};

#if defined(__CUDACC__)
__device__ KF_INLINE TensorView& view_in(SharedView& s) { return *reinterpret_cast<TensorView*>(s.bytes); }
#endif

// Blocks for a grid-stride loop over `work` items: enough to fill the device, no more than needed.
int grid_size(int64_t work, int blocks_per_sm = 8);

}  // namespace koopfast
