// Host-side helpers of the CUDA bindings (cuda_utils.h).
//
// Verified: compiles for sm_90 (scripts/check_cuda_compiles.sh), links against a CUDA build of
// torch (scripts/check_cuda_build.sh). NOT verified: nothing here has run on a GPU; every CUDA
// test in tests/ops/ goes through upload_sections (select, masks, codes, trajectory ingest).
#include "common/cuda_utils.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <utility>

namespace koopfast {

UploadedSections upload_sections(const std::vector<HostSection>& sections, c10::Device device) {
  constexpr size_t kAlign = 16;  // for any element type, and vector loads of them
  std::vector<size_t> offsets;
  size_t total = 0;
  for (const HostSection& s : sections) {
    offsets.push_back(total);
    total += (s.bytes + kAlign - 1) / kAlign * kAlign;
  }
  // Pinned staging and a non-blocking copy_: asynchronous, and torch's caching host allocator keeps
  // the staging buffer alive until the copy on the current stream has completed.
  at::Tensor host = at::empty({static_cast<int64_t>(std::max<size_t>(total, kAlign))},
                              at::TensorOptions().dtype(c10::kByte).pinned_memory(true));
  auto* p = static_cast<char*>(host.data_ptr());
  for (size_t i = 0; i < sections.size(); ++i) {
    if (sections[i].bytes != 0) std::memcpy(p + offsets[i], sections[i].data, sections[i].bytes);
  }
  UploadedSections up;
  up.storage = at::empty({host.numel()}, at::TensorOptions().dtype(c10::kByte).device(device));
  up.storage.copy_(host, /*non_blocking=*/true);
  const auto* d = static_cast<const char*>(up.storage.data_ptr());
  for (size_t off : offsets) up.at.push_back(d + off);
  return up;
}

UploadedTable upload_table(const std::vector<TensorView>& a, const std::vector<TensorView>& b,
                         const std::vector<Chunk>& chunks, const std::vector<void*>& out, c10::Device device) {
  UploadedSections s = upload_sections({section_of(a), section_of(b), section_of(chunks), section_of(out)}, device);
  UploadedTable up;
  DeviceTable& t = up.table;
  t.a = reinterpret_cast<const TensorView*>(s.at[0]);
  t.b = b.empty() ? t.a : reinterpret_cast<const TensorView*>(s.at[1]);
  t.chunks = reinterpret_cast<const Chunk*>(s.at[2]);
  t.out = out.empty() ? nullptr : reinterpret_cast<void* const*>(s.at[3]);
  t.num_chunks = static_cast<int64_t>(chunks.size());
  up.storage = std::move(s.storage);
  return up;
}

int grid_size(int64_t work, int blocks_per_sm) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));  // a cheap driver query
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, static_cast<int64_t>(sms) * blocks_per_sm)));
}

}  // namespace koopfast
