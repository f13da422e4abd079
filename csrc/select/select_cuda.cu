// CUDA backend of the select ops: multi-tensor chunked launches, block-private histograms.
//
// select_threshold: ceil(key bits / 11) histogram passes, each a grid-stride loop over fixed-size
// chunks of all tensors with a 2^11-bin shared-memory histogram per block (AIR top-k's digit
// width; lanes of a warp that fall into one bin add once), flushed to one global histogram; a
// one-block kernel then narrows the key range (the same range_descend as the CPU). The state
// lives on the device: no host synchronization.
// topk_mask: the stats are checked on the host by the shared argument layer (one small copy, as on
// the CPU: check_threshold_args); one pass writes the masks 16 bools per 16-byte store and, when
// only some ties are kept, counts ties per chunk; a one-block scan and a fix-up pass (launched only
// then) hand the kept ties out in (tensor, flat index) order.
// Each block copies the views of its current chunk into shared memory once per chunk.
//
// Verified: compiles for sm_90 (scripts/check_cuda_compiles.sh), links and registers against a
// CUDA build of torch (scripts/check_cuda_build.sh). NOT verified: nothing here has run on a GPU;
// neither the results nor the speed of the warp-aggregated histogram and the 16-byte mask stores
// have been measured. On a GPU machine tests/ops/test_select.py (every test takes the `device`
// fixture, cuda included: reference twins, ties, NaN, chunk boundaries, strided operands, opcheck,
// torch.compile, invalid stats) exercises every kernel here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cuda_utils.h"
#include "common/dispatch.h"
#include "select/select_args.h"

namespace koopfast {
namespace {

constexpr int kThreads = 256;
constexpr int kCudaDigitWidth = 11;
constexpr int kCudaBins = 1 << kCudaDigitWidth;
constexpr unsigned kFullMask = 0xffffffffu;

template <class K>
struct DeviceSelectState {
  RangeState<K> range;
  long long nan_tensor;  // first tensor index with a NaN score, LLONG_MAX if none
};

// Scores of one chunk's operands. The views live in shared memory (load_views); their data pointers
// and layout are read once per chunk into registers, and only strided operands consult the view's
// sizes and strides per element.
template <ScoreKind SK, class C, class S>
struct ScoreReader {
  const TensorView& a;
  const TensorView& b;
  const S* pa;
  const S* pb;
  bool contiguous;

  __device__ KF_INLINE ScoreReader(const TensorView& va, const TensorView& vb)
      : a(va), b(vb), pa(static_cast<const S*>(va.data)), pb(static_cast<const S*>(vb.data)),
        contiguous(va.contiguous() && (!score_is_binary(SK) || vb.contiguous())) {}

  __device__ KF_INLINE C operator()(int64_t i) const {
    const S x = contiguous ? pa[i] : pa[a.offset(i)];
    S y = x;
    if constexpr (score_is_binary(SK)) y = contiguous ? pb[i] : pb[b.offset(i)];
    return score_of<SK, C>(widen<C>(x), widen<C>(y));
  }
};

// Copies the views of chunk ch into shared memory; every thread of the block calls it, and calls
// __syncthreads() before the next load_views (the views are rewritten there).
__device__ KF_INLINE void load_views(const DeviceTable& t, const Chunk& ch, SharedView& a, SharedView& b) {
  if (threadIdx.x == 0) {
    view_in(a) = t.a[ch.tensor];
    view_in(b) = t.b[ch.tensor];
  }
  __syncthreads();
}

// f(i, valid, score) for tiles of blockDim.x consecutive elements of [begin, end): every thread
// of the block calls f the same number of times (valid is false past the end), so f may
// synchronize the block or the warp.
template <ScoreKind SK, class C, class S, class F>
__device__ KF_INLINE void tiles_of(const TensorView& a, const TensorView& b, int64_t begin, int64_t end, F& f) {
  const ScoreReader<SK, C, S> score(a, b);
  for (int64_t base = begin; base < end; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < end;
    f(i, valid, valid ? score(i) : C(0));
  }
}

// g(TypeTag<S>) for the stored type S of a floating dtype (others are rejected by
// prepare_select_inputs and do nothing here).
template <class G>
__device__ KF_INLINE void with_stored_type(DType d, G&& g) {
  switch (d) {
    case DType::Float16: g(TypeTag<c10::Half>{}); break;
    case DType::BFloat16: g(TypeTag<c10::BFloat16>{}); break;
    case DType::Float32: g(TypeTag<float>{}); break;
    case DType::Float64: g(TypeTag<double>{}); break;
    default: break;
  }
}

template <ScoreKind SK, class C, class F>
__device__ KF_INLINE void for_each_tile(const TensorView& a, const TensorView& b, int64_t begin, int64_t end, F& f) {
  with_stored_type(a.dtype, [&](auto tag) { tiles_of<SK, C, typename decltype(tag)::type>(a, b, begin, end, f); });
}

// f(i0, scores) for runs of kVec consecutive elements [i0, i0 + kVec) of [begin, end), thread j
// of the block taking the j-th run of each tile of kVec * blockDim.x elements; scores past end are
// not computed (they read as 0: f must stop at end). Used where each thread writes kVec outputs.
constexpr int kVec = 16;

template <ScoreKind SK, class C, class S, class F>
__device__ KF_INLINE void vec_tiles_of(const TensorView& a, const TensorView& b, int64_t begin, int64_t end, F& f) {
  const ScoreReader<SK, C, S> score(a, b);
  for (int64_t i0 = begin + static_cast<int64_t>(threadIdx.x) * kVec; i0 < end;
       i0 += static_cast<int64_t>(blockDim.x) * kVec) {
    C s[kVec];
#pragma unroll
    for (int u = 0; u < kVec; ++u) s[u] = i0 + u < end ? score(i0 + u) : C(0);
    f(i0, s);
  }
}

template <ScoreKind SK, class C, class F>
__device__ KF_INLINE void for_each_vec_tile(const TensorView& a, const TensorView& b, int64_t begin, int64_t end,
                                            F& f) {
  with_stored_type(a.dtype, [&](auto tag) { vec_tiles_of<SK, C, typename decltype(tag)::type>(a, b, begin, end, f); });
}

// ---- select_threshold -------------------------------------------------------------------------------

template <class K>
__global__ void select_init_kernel(DeviceSelectState<K>* state, unsigned long long* hist, int64_t k, int64_t total) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    RangeState<K> st;
    st.k_rem = k;
    st.n_bucket = total;
    state->range = st;
    state->nan_tensor = LLONG_MAX;
  }
  for (int i = threadIdx.x; i < kCudaBins; i += blockDim.x) hist[i] = 0;
}

template <ScoreKind SK, class C>
__global__ void __launch_bounds__(kThreads) select_hist_kernel(DeviceTable t, DeviceSelectState<typename KeyOf<C>::type>* state,
                                                               unsigned long long* hist) {
  using K = typename KeyOf<C>::type;
  __shared__ unsigned int block_hist[kCudaBins];
  __shared__ SharedView va, vb;
  const RangeState<K> st = state->range;
  const RangeBins<K> g = range_bins(st, kCudaDigitWidth);
  const K span = st.hi - st.lo;
  const unsigned lane = threadIdx.x & 31u;
  for (int i = threadIdx.x; i < kCudaBins; i += blockDim.x) block_hist[i] = 0;
  __syncthreads();
  for (int64_t c = blockIdx.x; c < t.num_chunks; c += gridDim.x) {
    const Chunk ch = t.chunks[c];
    load_views(t, ch, va, vb);
    bool nan = false;
    auto body = [&](int64_t, bool valid, C s) {
      nan |= valid && (s != s);
      const K key = to_key(s);
      const bool inside = valid && K(key - st.lo) <= span;
      const int bin = inside ? static_cast<int>(K(key - st.lo) >> g.shift) : -1;
      // Warp-aggregated: the lanes of a warp that share a bin add once, by their lowest lane. Weight-
      // like data puts most of a warp into a few bins in the first pass, where per-lane shared-memory
      // atomics on one address serialize. Every lane of the warp gets here together (tiles_of).
      if (__any_sync(kFullMask, inside)) {
        const unsigned peers = __match_any_sync(kFullMask, bin);
        if (inside && lane == static_cast<unsigned>(__ffs(peers) - 1)) {
          atomicAdd(&block_hist[bin], static_cast<unsigned>(__popc(peers)));
        }
      }
    };
    for_each_tile<SK, C>(view_in(va), view_in(vb), ch.begin, ch.end, body);
    if (nan) atomicMin(&state->nan_tensor, static_cast<long long>(ch.tensor));
    __syncthreads();  // va, vb are rewritten for the next chunk
  }
  for (int i = threadIdx.x; i < g.count; i += blockDim.x) {
    if (block_hist[i] != 0) atomicAdd(&hist[i], static_cast<unsigned long long>(block_hist[i]));
  }
}

template <class K>
__global__ void select_descend_kernel(DeviceSelectState<K>* state, unsigned long long* hist) {
  if (threadIdx.x == 0) {
    RangeState<K> st = state->range;
    range_descend(st, hist, range_bins(st, kCudaDigitWidth));
    state->range = st;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kCudaBins; i += blockDim.x) hist[i] = 0;
}

template <class C>
__global__ void select_finalize_kernel(const DeviceSelectState<typename KeyOf<C>::type>* state, C* threshold,
                                       int64_t* stats) {
  const long long nan = state->nan_tensor;
  if (nan != LLONG_MAX) {
    *threshold = std::numeric_limits<C>::quiet_NaN();
    stats[kNumGreater] = stats[kNumEqual] = stats[kNumTiesKept] = 0;
    stats[kNanTensor] = nan;
    return;
  }
  *threshold = from_key<C>(state->range.lo);
  stats[kNumGreater] = state->range.n_greater;
  stats[kNumEqual] = state->range.n_bucket;
  stats[kNumTiesKept] = state->range.k_rem;
  stats[kNanTensor] = -1;
}

template <class C>
void select_cuda(const SelectInputs& in, int64_t k, const at::Tensor& like, at::Tensor& threshold, at::Tensor& stats) {
  using K = typename KeyOf<C>::type;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const UploadedTable up = upload_table(in.a, in.b, make_chunks(in.a), {}, like.device());
  const DeviceTable& t = up.table;
  // Workspace: the state, then the global histogram (both 8-byte aligned).
  constexpr int64_t state_words = (sizeof(DeviceSelectState<K>) + 7) / 8;
  at::Tensor work = at::empty({state_words + kCudaBins}, like.options().dtype(c10::kLong));
  auto* state = reinterpret_cast<DeviceSelectState<K>*>(work.data_ptr<int64_t>());
  auto* hist = reinterpret_cast<unsigned long long*>(work.data_ptr<int64_t>() + state_words);

  select_init_kernel<K><<<1, kThreads, 0, stream>>>(state, hist, k, in.total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int passes = (8 * static_cast<int>(sizeof(K)) + kCudaDigitWidth - 1) / kCudaDigitWidth;
  const int grid = grid_size(t.num_chunks);
  dispatch_score(in.kind, [&](auto ktag) {
    constexpr ScoreKind SK = decltype(ktag)::value;
    for (int p = 0; p < passes; ++p) {
      select_hist_kernel<SK, C><<<grid, kThreads, 0, stream>>>(t, state, hist);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      select_descend_kernel<K><<<1, kThreads, 0, stream>>>(state, hist);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  select_finalize_kernel<C><<<1, 1, 0, stream>>>(state, threshold.data_ptr<C>(), stats.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> select_threshold_cuda(at::TensorList a, at::TensorList b, std::string_view score,
                                                         int64_t k) {
  constexpr const char* op = "select_threshold";
  auto in = prepare_select_inputs(op, a, b, score);
  check_select_k(op, in, k);
  const c10::cuda::CUDAGuard guard(a[0].device());
  auto threshold = at::empty({}, a[0].options().dtype(in.wide ? c10::kDouble : c10::kFloat));
  auto stats = at::empty({kNumSelectStats}, a[0].options().dtype(c10::kLong));
  if (in.wide) {
    select_cuda<double>(in, k, a[0], threshold, stats);
  } else {
    select_cuda<float>(in, k, a[0], threshold, stats);
  }
  return {threshold, stats};
}

// ---- topk_mask --------------------------------------------------------------------------------------

using TieReduce = cub::BlockReduce<long long, kThreads>;
using TieScan = cub::BlockScan<int, kThreads>;

// Masks are written kVec = 16 bools per thread with one 16-byte store (1-byte stores reach about a
// quarter of the store bandwidth, shared/docs/perf.md): the masks are fresh contiguous tensors, and
// chunks start at multiples of 2^16, so every full run is 16-byte aligned.
template <ScoreKind SK, class C>
__global__ void __launch_bounds__(kThreads) mask_kernel(DeviceTable t, const C* threshold, bool keep_all_ties,
                                                        long long* chunk_ties) {
  static_assert(kVec == 16 && kChunkElems % kVec == 0, "one uint4 store per run; runs never straddle chunks");
  __shared__ typename TieReduce::TempStorage reduce_storage;
  __shared__ SharedView va, vb;
  const C thr = *threshold;
  for (int64_t c = blockIdx.x; c < t.num_chunks; c += gridDim.x) {
    const Chunk ch = t.chunks[c];
    load_views(t, ch, va, vb);
    bool* out = static_cast<bool*>(t.out[ch.tensor]);
    long long ties = 0;
    auto body = [&](int64_t i0, const C (&s)[kVec]) {
      const int n = ch.end - i0 < kVec ? static_cast<int>(ch.end - i0) : kVec;
      uint32_t words[kVec / 4] = {0, 0, 0, 0};
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        const bool keep = u < n && (keep_all_ties ? s[u] >= thr : s[u] > thr);
        words[u / 4] |= static_cast<uint32_t>(keep) << (8 * (u % 4));  // byte u, little-endian
        ties += u < n && s[u] == thr;
      }
      if (n == kVec) {
        *reinterpret_cast<uint4*>(out + i0) = make_uint4(words[0], words[1], words[2], words[3]);
      } else {
        for (int u = 0; u < n; ++u) out[i0 + u] = (words[u / 4] >> (8 * (u % 4))) & 1u;
      }
    };
    for_each_vec_tile<SK, C>(view_in(va), view_in(vb), ch.begin, ch.end, body);
    if (!keep_all_ties) {
      const long long total = TieReduce(reduce_storage).Sum(ties);
      if (threadIdx.x == 0) chunk_ties[c] = total;
    }
    __syncthreads();  // reduce_storage, va and vb are reused by the next chunk
  }
}

// Exclusive prefix sum of chunk_ties into ties_before, by one block.
__global__ void __launch_bounds__(kThreads) tie_prefix_kernel(const long long* chunk_ties, long long* ties_before,
                                                              int64_t num_chunks) {
  using Scan = cub::BlockScan<long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  long long carry = 0;
  for (int64_t base = 0; base < num_chunks; base += kThreads) {
    const int64_t c = base + threadIdx.x;
    const long long v = c < num_chunks ? chunk_ties[c] : 0;
    long long before = 0, tile_total = 0;
    Scan(scan_storage).ExclusiveSum(v, before, tile_total);
    if (c < num_chunks) ties_before[c] = carry + before;
    carry += tile_total;
    __syncthreads();
  }
}

template <ScoreKind SK, class C>
__global__ void __launch_bounds__(kThreads) tie_fix_kernel(DeviceTable t, const C* threshold, int64_t ties_kept,
                                                           const long long* chunk_ties, const long long* ties_before) {
  __shared__ typename TieScan::TempStorage scan_storage;
  __shared__ SharedView va, vb;
  const C thr = *threshold;
  for (int64_t c = blockIdx.x; c < t.num_chunks; c += gridDim.x) {
    const long long quota = ties_kept - ties_before[c];
    if (chunk_ties[c] == 0 || quota <= 0) continue;  // uniform across the block
    const Chunk ch = t.chunks[c];
    load_views(t, ch, va, vb);
    bool* out = static_cast<bool*>(t.out[ch.tensor]);
    long long seen = 0;
    auto body = [&](int64_t i, bool valid, C s) {
      const int tie = valid && s == thr;
      int rank = 0, tile_ties = 0;
      TieScan(scan_storage).ExclusiveSum(tie, rank, tile_ties);
      if (tie && seen + rank < quota) out[i] = true;
      seen += tile_ties;
      __syncthreads();
    };
    for_each_tile<SK, C>(view_in(va), view_in(vb), ch.begin, ch.end, body);
    __syncthreads();  // va and vb are rewritten for the next chunk
  }
}

template <class C>
void mask_cuda(const SelectInputs& in, const at::Tensor& threshold, const ThresholdStats& stats,
               std::vector<at::Tensor>& masks) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<void*> out;
  for (auto& m : masks) out.push_back(m.data_ptr());
  const UploadedTable up = upload_table(in.a, in.b, make_chunks(in.a), out, threshold.device());
  const DeviceTable& t = up.table;
  at::Tensor ties = at::empty({2 * std::max<int64_t>(t.num_chunks, 1)}, threshold.options().dtype(c10::kLong));
  auto* chunk_ties = reinterpret_cast<long long*>(ties.data_ptr<int64_t>());
  long long* ties_before = chunk_ties + t.num_chunks;
  const int grid = grid_size(t.num_chunks);
  const C* thr = threshold.data_ptr<C>();
  const bool keep_all_ties = stats.keep_all_ties();
  dispatch_score(in.kind, [&](auto ktag) {
    constexpr ScoreKind SK = decltype(ktag)::value;
    mask_kernel<SK, C><<<grid, kThreads, 0, stream>>>(t, thr, keep_all_ties, chunk_ties);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (keep_all_ties) return;  // the masks are complete: no tie to hand out
    tie_prefix_kernel<<<1, kThreads, 0, stream>>>(chunk_ties, ties_before, t.num_chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tie_fix_kernel<SK, C><<<grid, kThreads, 0, stream>>>(t, thr, stats.ties_kept, chunk_ties, ties_before);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::vector<at::Tensor> topk_mask_cuda(at::TensorList a, at::TensorList b, std::string_view score,
                                       const at::Tensor& threshold, const at::Tensor& stats) {
  constexpr const char* op = "topk_mask";
  auto in = prepare_select_inputs(op, a, b, score);
  const c10::cuda::CUDAGuard guard(a[0].device());
  const ThresholdStats st = check_threshold_args(op, in, a[0], threshold, stats);
  std::vector<at::Tensor> masks;
  masks.reserve(a.size());
  for (const auto& x : a) masks.push_back(at::empty(x.sizes(), x.options().dtype(c10::kBool)));
  if (in.total == 0) return masks;
  if (in.wide) {
    mask_cuda<double>(in, threshold, st, masks);
  } else {
    mask_cuda<float>(in, threshold, st, masks);
  }
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CUDA, m) {
  m.impl("select_threshold", &select_threshold_cuda);
  m.impl("topk_mask", &topk_mask_cuda);
}

}  // namespace koopfast
