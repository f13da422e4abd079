// CUDA backend of the mask ops: one launch per op over fixed-size chunks of all tensors.
//
// Each block takes chunks in a grid-stride loop, copies the chunk's views into shared memory once,
// and its threads take consecutive elements (or packed bytes) of the chunk, so contiguous tensors
// are read and written coalesced. pack reads aligned contiguous bool masks eight bytes at a time
// (pack8, as the CPU); unpack writes eight bools per 8-byte store (unpack8). apply_masks writes +0
// to the pruned elements only and never reads the targets.
//
// Verified: compiles for sm_90 (scripts/check_cuda_compiles.sh), links and registers against a
// CUDA build of torch (scripts/check_cuda_build.sh). NOT verified: nothing here has run on a GPU.
// On a GPU machine tests/ops/test_masks.py (device-parametrized: reference twins, odd sizes,
// chunk boundaries, strided and offset views, opcheck) exercises every kernel here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <vector>

#include "common/checks.h"
#include "common/chunks.h"
#include "common/cuda_utils.h"
#include "masks/masks_args.h"

namespace koopfast {
namespace {

constexpr int kThreads = 256;

__device__ KF_INLINE int64_t offset_of(const TensorView& v, int64_t i) { return v.contiguous() ? i : v.offset(i); }

// Element i of a bool mask (any strides).
__device__ KF_INLINE bool bool_at(const TensorView& m, int64_t i) {
  return static_cast<const uint8_t*>(m.data)[offset_of(m, i)] != 0;
}

// ---- pack: thread per output byte -----------------------------------------------------------------

// A contiguous, 8-byte aligned bool mask is read eight elements per load (chunks start at multiples
// of 2^16, so byte j's elements 8j .. 8j + 7 are one aligned word).
__global__ void __launch_bounds__(kThreads) pack_kernel(DeviceTable t) {
  __shared__ SharedView sm;
  for (int64_t c = blockIdx.x; c < t.num_chunks; c += gridDim.x) {
    const Chunk ch = t.chunks[c];
    if (threadIdx.x == 0) view_in(sm) = t.a[ch.tensor];
    __syncthreads();
    const TensorView& m = view_in(sm);
    const bool words = m.contiguous() && (reinterpret_cast<uintptr_t>(m.data) & 7u) == 0;
    const auto* src = static_cast<const unsigned long long*>(m.data);
    uint8_t* out = static_cast<uint8_t*>(t.out[ch.tensor]);
    for (int64_t j = (ch.begin >> 3) + threadIdx.x; j < packed_bytes(ch.end); j += blockDim.x) {
      const int64_t end = ch.end < 8 * j + 8 ? ch.end : 8 * j + 8;
      if (words && end == 8 * j + 8) {
        out[j] = pack8(src[j]);
        continue;
      }
      uint8_t b = 0;
      for (int64_t i = 8 * j; i < end; ++i) b |= static_cast<uint8_t>(bool_at(m, i)) << (i & 7);
      out[j] = b;
    }
    __syncthreads();  // sm is rewritten for the next chunk
  }
}

// ---- unpack: thread per packed byte ---------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) unpack_kernel(DeviceTable t) {
  for (int64_t c = blockIdx.x; c < t.num_chunks; c += gridDim.x) {
    const Chunk ch = t.chunks[c];
    const TensorView& p = t.a[ch.tensor];
    const uint8_t* bits = static_cast<const uint8_t*>(p.data);
    const int64_t stride = p.strides[0];
    uint8_t* out = static_cast<uint8_t*>(t.out[ch.tensor]);
    for (int64_t j = (ch.begin >> 3) + threadIdx.x; j < packed_bytes(ch.end); j += blockDim.x) {
      const uint8_t b = bits[j * stride];
      const int64_t end = ch.end < 8 * j + 8 ? ch.end : 8 * j + 8;
      if (end == 8 * j + 8) {  // one 8-byte store: the output is a fresh tensor, 8j is 8-byte aligned
        *reinterpret_cast<unsigned long long*>(out + 8 * j) = unpack8(b);
        continue;
      }
      for (int64_t i = 8 * j; i < end; ++i) out[i] = (b >> (i & 7)) & 1;
    }
  }
}

// ---- count: per-block sums, one atomic add per chunk ------------------------------------------------

using CountReduce = cub::BlockReduce<long long, kThreads>;

__global__ void __launch_bounds__(kThreads) count_kernel(DeviceTable t, unsigned long long* counts) {
  __shared__ typename CountReduce::TempStorage storage;
  for (int64_t c = blockIdx.x; c < t.num_chunks; c += gridDim.x) {
    const Chunk ch = t.chunks[c];
    const TensorView& m = t.a[ch.tensor];
    long long n = 0;
    if (is_packed(m)) {
      const uint8_t* bits = static_cast<const uint8_t*>(m.data);
      const int64_t last = packed_bytes(ch.end) - 1;
      for (int64_t j = (ch.begin >> 3) + threadIdx.x; j <= last; j += blockDim.x) {
        const unsigned b = bits[j * m.strides[0]];
        n += __popc(j == last ? b & tail_bits(ch.end) : b);
      }
    } else {
      for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) n += bool_at(m, i);
    }
    const long long total = CountReduce(storage).Sum(n);
    if (threadIdx.x == 0 && total != 0) atomicAdd(&counts[ch.tensor], static_cast<unsigned long long>(total));
    __syncthreads();  // storage is reused by the next chunk
  }
}

// ---- apply: thread per element ----------------------------------------------------------------------

template <class U>
__device__ KF_INLINE void zero_pruned(const TensorView& x, const TensorView& m, const Chunk& ch) {
  U* px = static_cast<U*>(x.data);
  const uint8_t* pm = static_cast<const uint8_t*>(m.data);
  if (is_packed(m)) {
    for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) {
      if (!packed_bit(pm, m.strides[0], i)) px[offset_of(x, i)] = U(0);
    }
  } else {
    for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) {
      if (pm[offset_of(m, i)] == 0) px[offset_of(x, i)] = U(0);
    }
  }
}

__global__ void __launch_bounds__(kThreads) apply_kernel(DeviceTable t) {
  __shared__ SharedView sx, sm;  // the chunk's views, read from global memory once per chunk
  for (int64_t c = blockIdx.x; c < t.num_chunks; c += gridDim.x) {
    const Chunk ch = t.chunks[c];
    if (threadIdx.x == 0) {
      view_in(sx) = t.a[ch.tensor];
      view_in(sm) = t.b[ch.tensor];
    }
    __syncthreads();
    const TensorView& x = view_in(sx);
    const TensorView& m = view_in(sm);
    switch (element_bytes(x.dtype)) {
      case 2: zero_pruned<uint16_t>(x, m, ch); break;
      case 4: zero_pruned<uint32_t>(x, m, ch); break;
      case 8: zero_pruned<unsigned long long>(x, m, ch); break;
      default: break;  // rejected by prepare_apply
    }
    __syncthreads();  // sx, sm are rewritten for the next chunk
  }
}

// ---- bindings -----------------------------------------------------------------------------------------

std::vector<at::Tensor> pack_masks_cuda(at::TensorList masks) {
  const MaskLists in = prepare_pack("pack_masks", masks);
  std::vector<at::Tensor> out;
  std::vector<void*> dst;
  if (masks.empty()) return out;
  const c10::cuda::CUDAGuard guard(masks[0].device());
  for (const auto& m : masks) {
    out.push_back(at::empty({packed_bytes(m.numel())}, m.options().dtype(c10::kByte)));
    dst.push_back(out.back().data_ptr());
  }
  if (in.total == 0) return out;
  const UploadedTable up = upload_table(in.a, {}, make_chunks(in.numels), dst, masks[0].device());
  pack_kernel<<<grid_size(up.table.num_chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(up.table);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> unpack_masks_cuda(at::TensorList packed, at::IntArrayRef numels) {
  const MaskLists in = prepare_unpack("unpack_masks", packed, numels);
  std::vector<at::Tensor> out;
  std::vector<void*> dst;
  if (packed.empty()) return out;
  const c10::cuda::CUDAGuard guard(packed[0].device());
  for (size_t i = 0; i < packed.size(); ++i) {
    out.push_back(at::empty({numels[i]}, packed[i].options().dtype(c10::kBool)));
    dst.push_back(out.back().data_ptr());
  }
  if (in.total == 0) return out;
  const UploadedTable up = upload_table(in.a, {}, make_chunks(in.numels), dst, packed[0].device());
  unpack_kernel<<<grid_size(up.table.num_chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(up.table);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor count_masks_cuda(at::TensorList masks, at::IntArrayRef numels) {
  const MaskLists in = prepare_count("count_masks", masks, numels);
  TORCH_CHECK(!masks.empty(), "koopfast::count_masks: internal error: an empty list reached the CUDA kernel");
  const c10::cuda::CUDAGuard guard(masks[0].device());
  at::Tensor counts = at::zeros({static_cast<int64_t>(masks.size())}, masks[0].options().dtype(c10::kLong));
  if (in.total == 0) return counts;
  const UploadedTable up = upload_table(in.a, {}, make_chunks(in.numels), {}, masks[0].device());
  count_kernel<<<grid_size(up.table.num_chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      up.table, reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

void apply_masks_cuda(at::TensorList targets, at::TensorList masks, at::IntArrayRef mask_index) {
  const MaskLists in = prepare_apply("apply_masks", targets, masks, mask_index);
  if (in.total == 0) return;
  const c10::cuda::CUDAGuard guard(targets[0].device());
  const UploadedTable up = upload_table(in.a, in.b, make_chunks(in.numels), {}, targets[0].device());
  apply_kernel<<<grid_size(up.table.num_chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(up.table);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CUDA, m) {
  m.impl("pack_masks", &pack_masks_cuda);
  m.impl("unpack_masks", &unpack_masks_cuda);
  m.impl("count_masks", &count_masks_cuda);
  m.impl("apply_masks", &apply_masks_cuda);
}

}  // namespace koopfast
