// CUDA backend of the codes ops.
//
// sign_codes: one warp per output word: each lane compares two elements (coalesced reads along the
// innermost dimension) and two __ballot_sync calls assemble the 64 bits. Grid-stride over words.
// hamming_distance: one warp per chunk (make_code_chunks, as on the CPU); per row, lanes stride over
// the words with __popcll, a warp reduction, and one atomicAdd per row and chunk. Its table goes up
// with the shared upload_sections (one pinned buffer, one asynchronous copy).
// pairwise_hamming: one 16x16 thread block per 16x16 tile of the upper triangle of the distance
// matrix, 32 words of each of its 32 rows staged in shared memory per step; the tile is written to
// both halves. Block rows loop over tile rows, so any number of units works (as on the CPU).
//
// Verified: compiles for sm_90 (scripts/check_cuda_compiles.sh), links and registers against a
// CUDA build of torch (scripts/check_cuda_build.sh). NOT verified: nothing here has run on a GPU.
// On a GPU machine tests/ops/test_codes.py (device-parametrized) exercises every kernel here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "codes/codes_args.h"
#include "common/checks.h"
#include "common/cuda_utils.h"

namespace koopfast {
namespace {

constexpr int kThreads = 256;  // a multiple of 32: every warp is full
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ KF_INLINE int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
}
__device__ KF_INLINE int64_t warps_in_grid() { return (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5; }

// ---- sign_codes ---------------------------------------------------------------------------------

template <class S>
__device__ KF_INLINE bool is_positive(S v) {
  if constexpr (std::is_same_v<S, bool>) {
    return v;
  } else if constexpr (std::is_same_v<S, c10::Half> || std::is_same_v<S, c10::BFloat16>) {
    return static_cast<float>(v) > 0.0f;
  } else {
    return v > S(0);  // NaN gives 0, like torch's x > 0
  }
}

template <class S>
__global__ void __launch_bounds__(kThreads) sign_codes_kernel(SignInput in, int64_t words, int64_t* out) {
  const int lane = threadIdx.x & 31;
  const int64_t bits = in.outer * in.inner;
  const int64_t items = in.units * words;
  const S* data = static_cast<const S*>(in.data);
  for (int64_t item = global_warp(); item < items; item += warps_in_grid()) {  // warp-uniform
    const int64_t u = item / words;
    const int64_t w = item - u * words;
    const int64_t j0 = w * kBitsPerWord;
    const int64_t o0 = j0 / in.inner;  // coordinates of the word's first bit
    const int64_t i0 = j0 - o0 * in.inner;
    unsigned half[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t step = h * 32 + lane;  // < 64
      bool bit = false;
      if (j0 + step < bits) {
        int64_t o = o0;
        int64_t i = i0 + step;  // < inner + 64: carry into o
        if (i >= in.inner) {
          if (in.inner >= kBitsPerWord) {
            i -= in.inner;
            o += 1;
          } else {  // small values: 32-bit division
            const unsigned q = static_cast<unsigned>(i) / static_cast<unsigned>(in.inner);
            o += q;
            i -= static_cast<int64_t>(q) * in.inner;
          }
        }
        bit = is_positive(data[o * in.outer_stride + u * in.unit_stride + i * in.inner_stride]);
      }
      half[h] = __ballot_sync(kFullMask, bit);
    }
    if (lane == 0) {
      out[u * words + w] = static_cast<int64_t>((static_cast<unsigned long long>(half[1]) << 32) | half[0]);
    }
  }
}

at::Tensor sign_codes_cuda(const at::Tensor& x, int64_t dim) {
  constexpr const char* op = "sign_codes";
  const SignCodesInput in = prepare_sign_codes(op, x, dim);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor codes = empty_codes(in, x);
  if (codes.numel() == 0) return codes;
  const int64_t words = codes.size(1);
  const int grid = grid_size((codes.numel() + kWarpsPerBlock - 1) / kWarpsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t* out = codes.data_ptr<int64_t>();
  switch (in.dtype) {
    case c10::kHalf: sign_codes_kernel<c10::Half><<<grid, kThreads, 0, stream>>>(in.view, words, out); break;
    case c10::kBFloat16: sign_codes_kernel<c10::BFloat16><<<grid, kThreads, 0, stream>>>(in.view, words, out); break;
    case c10::kFloat: sign_codes_kernel<float><<<grid, kThreads, 0, stream>>>(in.view, words, out); break;
    case c10::kDouble: sign_codes_kernel<double><<<grid, kThreads, 0, stream>>>(in.view, words, out); break;
    case c10::kBool: sign_codes_kernel<bool><<<grid, kThreads, 0, stream>>>(in.view, words, out); break;
    default: TORCH_CHECK(false, "koopfast::sign_codes: internal error: unchecked dtype");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return codes;
}

// ---- hamming_distance ---------------------------------------------------------------------------

struct HammingTable {
  const CodeMatrix* a = nullptr;
  const CodeMatrix* b = nullptr;  // null: popcount of a
  const CodeChunk* chunks = nullptr;
  int64_t* const* out = nullptr;
  int64_t num_chunks = 0;
};

__global__ void __launch_bounds__(kThreads) hamming_kernel(HammingTable t) {
  const int lane = threadIdx.x & 31;
  for (int64_t c = global_warp(); c < t.num_chunks; c += warps_in_grid()) {  // warp-uniform
    const CodeChunk ch = t.chunks[c];
    const CodeMatrix a = t.a[ch.tensor];
    const bool has_b = t.b != nullptr;
    const CodeMatrix b = has_b ? t.b[ch.tensor] : a;
    auto* out = reinterpret_cast<unsigned long long*>(t.out[ch.tensor]);
    for (int64_t r = ch.row_begin; r < ch.row_end; ++r) {
      unsigned long long s = 0;
      for (int64_t k = ch.word_begin + lane; k < ch.word_end; k += 32) {
        const long long x = a.at(r, k);
        s += static_cast<unsigned long long>(__popcll(has_b ? x ^ b.at(r, k) : x));
      }
      for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(kFullMask, s, offset);
      if (lane == 0 && s != 0) atomicAdd(out + r, s);
    }
  }
}

std::vector<at::Tensor> hamming_distance_cuda(at::TensorList a, at::TensorList b) {
  constexpr const char* op = "hamming_distance";
  const HammingInputs in = prepare_hamming(op, a, b);
  const c10::cuda::CUDAGuard guard(a[0].device());
  std::vector<at::Tensor> out;
  std::vector<int64_t*> dst;
  for (size_t t = 0; t < a.size(); ++t) {
    out.push_back(at::zeros({in.a[t].rows}, a[t].options().dtype(c10::kLong)));
    dst.push_back(out.back().data_ptr<int64_t>());
  }
  const std::vector<CodeChunk> chunks = make_code_chunks(in.a);
  if (chunks.empty()) return out;

  const UploadedSections up =
      upload_sections({section_of(in.a), section_of(in.b), section_of(chunks), section_of(dst)}, a[0].device());
  HammingTable t;
  t.a = reinterpret_cast<const CodeMatrix*>(up.at[0]);
  t.b = in.b.empty() ? nullptr : reinterpret_cast<const CodeMatrix*>(up.at[1]);
  t.chunks = reinterpret_cast<const CodeChunk*>(up.at[2]);
  t.out = reinterpret_cast<int64_t* const*>(up.at[3]);
  t.num_chunks = static_cast<int64_t>(chunks.size());

  const int grid = grid_size((t.num_chunks + kWarpsPerBlock - 1) / kWarpsPerBlock);
  hamming_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(t);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;  // `up.storage` is freed to the caching allocator, stream-ordered after the kernel
}

// ---- pairwise_hamming ---------------------------------------------------------------------------

constexpr int kPairTile = 16;   // rows per tile side; a block is kPairTile x kPairTile threads
constexpr int kPairWords = 32;  // words per row staged per step

// Tile (I, J), I <= J: the distances between rows [16 I, 16 I + 16) and [16 J, 16 J + 16).
__device__ KF_INLINE void pairwise_tile(const CodeMatrix& c, int64_t I, int64_t J, int64_t* out,
                                        long long (*rows_i)[kPairWords + 1], long long (*rows_j)[kPairWords + 1]) {
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * kPairTile + tx;
  const int64_t i0 = I * kPairTile;
  const int64_t j0 = J * kPairTile;
  unsigned long long s = 0;
  for (int64_t k0 = 0; k0 < c.words; k0 += kPairWords) {
    for (int e = tid; e < kPairTile * kPairWords; e += kPairTile * kPairTile) {
      const int r = e / kPairWords;
      const int k = e - r * kPairWords;
      const bool in_k = k0 + k < c.words;
      rows_i[r][k] = (in_k && i0 + r < c.rows) ? c.at(i0 + r, k0 + k) : 0;
      rows_j[r][k] = (in_k && j0 + r < c.rows) ? c.at(j0 + r, k0 + k) : 0;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kPairWords; ++k) s += static_cast<unsigned long long>(__popcll(rows_i[ty][k] ^ rows_j[tx][k]));
    __syncthreads();
  }
  const int64_t i = i0 + ty;
  const int64_t j = j0 + tx;
  if (i < c.rows && j < c.rows) {
    out[i * c.rows + j] = static_cast<int64_t>(s);
    if (I != J) out[j * c.rows + i] = static_cast<int64_t>(s);
  }
}

// Block (x, y) takes tiles (I, J = x) for I = y, y + gridDim.y, ...: gridDim.y stays within its
// limit of 65535 for any number of rows (the CPU kernel has no such limit either).
__global__ void __launch_bounds__(kPairTile* kPairTile) pairwise_kernel(CodeMatrix c, int64_t tiles, int64_t* out) {
  __shared__ long long rows_i[kPairTile][kPairWords + 1];  // +1: no bank conflicts on column reads
  __shared__ long long rows_j[kPairTile][kPairWords + 1];
  const int64_t J = blockIdx.x;
  for (int64_t I = blockIdx.y; I <= J && I < tiles; I += gridDim.y) {  // block-uniform
    pairwise_tile(c, I, J, out, rows_i, rows_j);
  }
}

at::Tensor pairwise_hamming_cuda(const at::Tensor& codes) {
  constexpr const char* op = "pairwise_hamming";
  const CodeMatrix c = code_matrix(op, codes, "codes");
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty({c.rows, c.rows}, codes.options().dtype(c10::kLong));
  if (c.rows == 0) return out;
  // rows^2 int64 were allocated, so tiles = rows / 16 is far below gridDim.x's limit of 2^31 - 1.
  const int64_t tiles = (c.rows + kPairTile - 1) / kPairTile;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min<int64_t>(tiles, 65535)));
  const dim3 block(kPairTile, kPairTile);
  pairwise_kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(c, tiles, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CUDA, m) {
  m.impl("sign_codes", &sign_codes_cuda);
  m.impl("hamming_distance", &hamming_distance_cuda);
  m.impl("pairwise_hamming", &pairwise_hamming_cuda);
}

}  // namespace koopfast
